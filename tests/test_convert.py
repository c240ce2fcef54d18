"""`convert --to lora`: PEFT itself, loading the converted directory, reproduces the native family's logits."""

from __future__ import annotations

import json

import pytest
import torch

from adapter_cases import make
from tenfold.adapters import AdapterMismatchError, NoExactLoRAError, attach, load_adapter
from tenfold.adapters.convert import convert_to_lora

EXACT = ["lora", "lorta_heads_in", "lorta_heads_out", "loretta_rep", "miss", "miss_mini"]


@pytest.mark.parametrize("case", EXACT)
def test_peft_loads_the_converted_lora_with_identical_logits(case, model_name, tiny_model_dirs, hf_models, specs,
                                                             tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = specs[model_name]
    adapter = make(case, spec, seed=61)
    adapter.validate(spec)
    out = convert_to_lora(adapter, tmp_path / "lora")
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(62))
    with torch.no_grad():
        with attach(hf_models[model_name], adapter):
            native = hf_models[model_name](ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[model_name], dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(fresh, out).eval()
        via_peft = peft_model(ids).logits
        base = hf_models[model_name](ids).logits
    del peft_model, fresh  # PEFT injected its layers into this private copy only
    assert (native - base).abs().max() > 0.05
    assert (via_peft - native).abs().max().item() <= 1e-5
    reread = load_adapter(out, spec)
    assert reread.family == "lora" and reread.targets == adapter.targets


@pytest.mark.parametrize("case", ["bat", "loretta_adp"])
@pytest.mark.parametrize("bound", [True, False])
def test_conversion_is_refused_without_an_exact_form(case, bound, specs, tmp_path):
    adapter = make(case, specs["mha"])
    if bound:
        adapter.validate(specs["mha"])
    else:
        adapter.spec = None  # refused for what it is, not for a missing base model
    with pytest.raises(NoExactLoRAError) as refused:
        convert_to_lora(adapter, tmp_path / "out")
    message = str(refused.value)
    assert message.startswith(f"{adapter.family} has no exact LoRA form") and "native path" in message
    assert "refuse" in message  # why: says conversion is refused, not merely unsupported
    assert not (tmp_path / "out").exists()


def test_conversion_needs_a_base_model(specs, tmp_path):
    adapter = make("lorta_heads_in", specs["mha"])
    adapter.spec = None
    with pytest.raises(AdapterMismatchError, match="base model"):
        convert_to_lora(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conversion_never_overwrites(specs, tmp_path):
    adapter = make("lora", specs["mha"])
    adapter.validate(specs["mha"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        convert_to_lora(adapter, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("user file")
    with pytest.raises(FileExistsError):
        convert_to_lora(adapter, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "user file"
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    convert_to_lora(adapter, tmp_path / "empty", base_model="tiny")
    assert json.loads((tmp_path / "empty" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
