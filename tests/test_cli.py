"""The `tenfold` command line: inspect (text and --json) and convert, including its refusals and user errors.

A few checks run the real command (`python -m tenfold.cli`: one interpreter start costs seconds, most of it
importing torch and transformers); the rest call `main([...])` in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapter_cases import make
from tenfold.adapters import save_adapter
from tenfold.adapters.convert import convert_to_lora
from tenfold.cli import main


@pytest.fixture(scope="module")
def saved(specs, tmp_path_factory):
    """tenfold-format adapters on the gqa model (they carry the base model's shapes), and PEFT LoRA directories
    that do not: one naming no base model, one naming the tiny model's local directory."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for case in ("lorta_heads_out", "bat", "miss_mini", "loretta_adp"):
        adapter = make(case, specs["gqa"], seed=71)
        adapter.validate(specs["gqa"])
        save_adapter(adapter, root / case)
        out[case] = (root / case, adapter)
    return out


@pytest.fixture(scope="module")
def peft_dirs(saved, tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_peft")
    adapter = saved["miss_mini"][1]
    return {"unnamed": convert_to_lora(adapter, root / "unnamed"),
            "named": convert_to_lora(adapter, root / "named", base_model=str(tiny_model_dirs["gqa"]))}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tenfold.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def disk_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def file_params(path) -> int:
    """Parameters in the adapter's tensor file, read with safetensors directly (not through tenfold)."""
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def widths(spec, module) -> tuple[int, int]:
    """(in, out) of a Llama module, from the config numbers (not from tenfold's ModelSpec.shapes)."""
    d, q, kv, ff = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, ff),
            "up_proj": (d, ff), "down_proj": (ff, d)}[module]


# The cases' hyperparameters (tests/adapter_cases.py) and each family's sizes, written out from its definition.
CASE_FACTS = {
    "lorta_heads_out": dict(family="lorta", rank=8, targets=["k_proj", "o_proj", "q_proj", "v_proj"], exact=True),
    "bat": dict(family="bat", rank=16, targets=["down_proj", "k_proj", "q_proj", "v_proj"], exact=False),
    "miss_mini": dict(family="miss", rank=16, targets=["down_proj", "gate_proj", "q_proj", "v_proj"], exact=True),
    "loretta_adp": dict(family="loretta_adp", rank=16, targets=["down_proj", "gate_proj", "up_proj"], exact=False),
}


def expected_params(case, spec) -> int | None:
    """Trainable parameters from the family's definition; None where the TT mode split is the trainer's choice."""
    r, layers = CASE_FACTS[case]["rank"], spec.num_layers
    if case == "lorta_heads_out":  # A [d, r], B [r, d_h], C_l [L, r], C_h [H, r], C_m [4, r]
        return r * (spec.hidden_size + spec.head_dim + layers + spec.num_heads + 4)
    if case == "bat":  # [out/r, r, r] per module
        return layers * sum(widths(spec, m)[1] * r for m in CASE_FACTS[case]["targets"])
    if case == "miss_mini":  # [r, mini_r] per module, mini_r = 32
        return layers * len(CASE_FACTS[case]["targets"]) * r * 32
    return None


def dense_bytes(case, spec, element_size=4) -> int:
    """The same update as per-layer dense factors: LoRA at the rank (r x (in + out)), or the untensorized bottleneck
    (d x b twice plus both biases) for LoRETTA adp."""
    r, targets = CASE_FACTS[case]["rank"], CASE_FACTS[case]["targets"]
    if case == "loretta_adp":
        d = spec.hidden_size
        per_layer = len(targets) * (2 * d * r + r + d)
    else:
        per_layer = sum(r * sum(widths(spec, m)) for m in targets)
    return spec.num_layers * per_layer * element_size


def check_summary(info: dict, path, case, spec) -> None:
    facts = CASE_FACTS[case]
    assert info["family"] == facts["family"] and info["rank"] == facts["rank"]
    assert info["target_modules"] == facts["targets"]
    assert info["exact_lora"] is facts["exact"]
    assert info["params"] == file_params(path)
    if expected_params(case, spec) is not None:
        assert info["params"] == expected_params(case, spec)
    assert info["bytes"] == disk_bytes(path)
    assert info["lora_equivalent_bytes"] == dense_bytes(case, spec)  # fp32 factors
    assert isinstance(info["details"], dict)


# --- the real command --------------------------------------------------------------------------------------------

def test_command_inspect_json(saved):
    path, adapter = saved["lorta_heads_out"]
    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)  # exactly one JSON document on stdout
    check_summary(info, path, "lorta_heads_out", adapter.spec)
    assert info["details"]["orientation"] == "heads_out"
    assert info["lora_equivalent_bytes"] > 10 * info["bytes"]  # the point of a tensor adapter


def test_command_convert_refuses_bat(saved, tmp_path):
    result = run_cli("convert", saved["bat"][0], tmp_path / "bat_lora", "--to", "lora")
    assert result.returncode == 2
    assert result.stderr.startswith("tenfold: error: ") and "Traceback" not in result.stderr
    assert "bat" in result.stderr and "native" in result.stderr
    assert not (tmp_path / "bat_lora").exists()


def test_command_rejects_a_non_adapter_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    result = run_cli("inspect", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("tenfold: error: ") and "adapter_config.json" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- in-process ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["lorta_heads_out", "bat", "miss_mini", "loretta_adp"])
def test_inspect_json(saved, case, capsys):
    path, adapter = saved[case]
    code, out, err = run_main(capsys, "inspect", path, "--json")
    assert code == 0, err
    check_summary(json.loads(out), path, case, adapter.spec)


def test_inspect_text(saved, capsys):
    path, adapter = saved["lorta_heads_out"]
    code, out, _ = run_main(capsys, "inspect", path)
    assert code == 0
    assert "lorta" in out and "heads_out" in out and "exact LoRA     yes" in out
    assert f"{expected_params('lorta_heads_out', adapter.spec):,}" in out
    assert f"{dense_bytes('lorta_heads_out', adapter.spec):,}" in out
    code, out, _ = run_main(capsys, "inspect", saved["bat"][0])
    assert code == 0 and "bat" in out and "native path" in out


def test_inspect_without_a_base_model_says_so(peft_dirs, tiny_model_dirs, saved, capsys):
    path = peft_dirs["unnamed"]
    code, out, _ = run_main(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "lora" and info["lora_equivalent_bytes"] is None
    code, out, _ = run_main(capsys, "inspect", path)
    assert code == 0 and "unknown" in out and "--base" in out
    # --base sizes it; so does a base_model_name_or_path that names a local model directory
    expected = dense_bytes("miss_mini", saved["miss_mini"][1].spec)
    for args in (["--base", tiny_model_dirs["gqa"]], []):
        target = path if args else peft_dirs["named"]
        code, out, err = run_main(capsys, "inspect", target, "--json", *args)
        assert code == 0, err
        assert json.loads(out)["lora_equivalent_bytes"] == expected


def test_inspect_validates_against_base(peft_dirs, tiny_model_dirs, capsys):
    # the gqa adapter's k/v shapes do not fit the mha model
    code, out, err = run_main(capsys, "inspect", peft_dirs["unnamed"], "--base", tiny_model_dirs["mha"])
    assert code == 2 and out == "" and err.startswith("tenfold: error: ") and "expected shape" in err


def test_convert(saved, tiny_model_dirs, tmp_path, capsys):
    from tenfold.adapters import load_adapter

    out_dir = tmp_path / "as_lora"
    code, out, err = run_main(capsys, "convert", saved["miss_mini"][0], out_dir, "--to", "lora")
    assert code == 0, err
    assert "miss" in out and str(out_dir) in out
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(tiny_model_dirs["gqa"])  # recorded from the adapter's spec
    assert load_adapter(out_dir).family == "lora"


def test_convert_refusals(saved, peft_dirs, tmp_path, capsys):
    code, _, err = run_main(capsys, "convert", saved["loretta_adp"][0], tmp_path / "adp", "--to", "lora")
    assert code == 2 and "loretta_adp" in err and "native path" in err
    assert not (tmp_path / "adp").exists()
    # never overwrite user files
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user file")
    code, _, err = run_main(capsys, "convert", saved["miss_mini"][0], tmp_path / "taken", "--to", "lora")
    assert code == 2 and "refusing to overwrite" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    # a PEFT LoRA that names no base model cannot be converted without --base
    code, _, err = run_main(capsys, "convert", peft_dirs["unnamed"], tmp_path / "again", "--to", "lora")
    assert code == 2 and "--base" in err and not (tmp_path / "again").exists()


def test_user_errors_are_clean(tmp_path, capsys):
    code, out, err = run_main(capsys, "inspect", tmp_path / "absent")
    assert code == 2 and out == "" and err.startswith("tenfold: error: ") and "absent" in err
    code, _, err = run_main(capsys, "inspect", tmp_path, "--base", tmp_path / "no_model")
    assert code == 2 and err.startswith("tenfold: error: --base ") and "not a directory" in err
    code, _, err = run_main(capsys, "inspect", tmp_path, "--base", tmp_path)
    assert code == 2 and err.startswith("tenfold: error: --base ") and "config.json" in err
    (tmp_path / "adapter_config.json").write_text("{not json")
    code, _, err = run_main(capsys, "inspect", tmp_path)
    assert code == 2 and "not valid JSON" in err


@pytest.mark.parametrize("flags", [["--grpc-tls-cert", "c.pem", "--grpc-tls-key", "k.pem"],
                                   ["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"]])
def test_replicas_refuse_tls_rather_than_serve_plaintext(flags, tmp_path):
    """The cluster's front doors are Ray Serve's proxies, without TLS: asking for TLS there is an error at start."""
    pytest.importorskip("ray", reason="tenfold serve --replicas runs on Ray Serve (the ray extra)")
    with pytest.raises(SystemExit, match="serve without TLS"):
        main(["serve", str(tmp_path), "--replicas", "2", *flags])
