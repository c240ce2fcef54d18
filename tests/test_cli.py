"""The `tenfold` command line: inspect (text and --json) and convert, including its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapter_cases import make
from tenfold.adapters import save_adapter
from tenfold.server.cli import main


@pytest.fixture(scope="module")
def saved(specs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for case in ("lorta_heads_out", "bat", "miss_mini"):
        adapter = make(case, specs["gqa"], seed=71)
        adapter.validate(specs["gqa"])
        save_adapter(adapter, root / case)
        out[case] = (root / case, adapter)
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tenfold.server.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("case", ["lorta_heads_out", "bat", "miss_mini"])
def test_inspect_json(saved, case):
    path, adapter = saved[case]
    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    files = sum(p.stat().st_size for p in path.iterdir())
    assert info["family"] == adapter.family and info["rank"] == adapter.rank
    assert info["params"] == sum(t.numel() for t in adapter.tensors().values())
    assert info["bytes"] == files and info["exact_lora"] == adapter.has_exact_lora
    assert info["target_modules"] == sorted({m for _, m in adapter.targets})
    spec = adapter.spec
    dense = sum(adapter.rank * sum(spec.module_shape(m)) for _, m in adapter.targets) * 4
    assert info["lora_equivalent_bytes"] == dense
    if case == "lorta_heads_out":
        assert info["lora_equivalent_bytes"] > 10 * info["bytes"]


def test_inspect_text_in_process(saved, capsys):
    path, _ = saved["lorta_heads_out"]
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "lorta" in text and "heads_out" in text and "exact LoRA     yes" in text


def test_convert_and_refusal(saved, tmp_path):
    ok = run_cli("convert", saved["miss_mini"][0], tmp_path / "as_lora", "--to", "lora")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "as_lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    refused = run_cli("convert", saved["bat"][0], tmp_path / "bat_lora", "--to", "lora")
    assert refused.returncode == 2
    assert "bat" in refused.stderr and "native path" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "bat_lora").exists()


def test_errors_are_clean(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    result = run_cli("inspect", tmp_path)
    assert result.returncode == 2
    assert "adapter_config.json" in result.stderr and "Traceback" not in result.stderr
    missing = run_cli("inspect", tmp_path / "absent")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
