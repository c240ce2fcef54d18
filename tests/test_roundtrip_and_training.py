"""tenfold's own format round-trips every family exactly; a few training steps lower the loss for every family."""

from __future__ import annotations

import json

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.adapters import attach, load_adapter, save_adapter
from tenfold.adapters.training import tokenize_batches, train


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_round_trip(case, tmp_path, hf_models, specs):
    spec = specs["gqa"]
    adapter = make(case, spec, seed=21)
    adapter.validate(spec)
    save_adapter(adapter, tmp_path / case)
    config = json.loads((tmp_path / case / "adapter_config.json").read_text())
    assert config["family"] == adapter.family and config["format"] == "tenfold"
    assert config["base_model"]["num_kv_heads"] == spec.num_kv_heads
    assert all(config["tensors"][name]["shape"] == list(t.shape) for name, t in adapter.tensors().items())

    loaded = load_adapter(tmp_path / case)  # the file carries the base model's shapes: validated on load
    assert type(loaded) is type(adapter) and loaded.config == adapter.config and loaded.spec == spec
    assert loaded.tensors().keys() == adapter.tensors().keys()
    for name, value in adapter.tensors().items():
        assert torch.equal(loaded.tensors()[name], value), name

    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with attach(hf_models["gqa"], adapter):
            expected = hf_models["gqa"](ids).logits
        with attach(hf_models["gqa"], loaded):
            found = hf_models["gqa"](ids).logits
    assert torch.equal(expected, found)


TOY_TEXTS = ["The river runs past the old mill and under the stone bridge.",
             "Servers answer requests and adapters change how the model speaks."] * 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss(case, hf_models, specs, tiny_model_dirs):
    from transformers import AutoTokenizer

    model, spec = hf_models["mha"], specs["mha"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["mha"])
    batches = tokenize_batches(tokenizer, TOY_TEXTS, batch_size=4)
    adapter = make(case, spec, seed=8, init="zero")
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(**batches[0]).logits
    losses = train(model, adapter, batches, steps=12, lr=2e-2, progress=False)
    assert losses[-1] < losses[0] - 0.3, f"{case}: loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, before), "training must leave the base model untouched"
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad flags must be restored"
