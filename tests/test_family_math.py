"""Every family's on-the-fly module equals its dense delta merged into the weights; exact LoRA forms are exact."""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.adapters import NoExactLoRAError, attach
from tenfold.adapters.attach import find_linears

LINEAR_DELTA_CASES = [c for c, (family, _) in CASES.items() if family != "loretta_adp"]
EXACT_LORA_CASES = [c for c, (family, _) in CASES.items() if family not in ("bat", "loretta_adp")]


def random_ids(seed: int, batch: int = 3, length: int = 14) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def merged_logits(model, adapter, ids):
    """Logits with every delta added into the base weights (then restored)."""
    linears = find_linears(model)
    saved = {}
    try:
        for key in adapter.targets:
            weight = linears[key][2].weight
            saved[key] = weight.data.clone()
            weight.data += adapter.delta(key, weight.data)
        return model(ids).logits
    finally:
        for key, original in saved.items():
            linears[key][2].weight.data.copy_(original)


@pytest.mark.parametrize("case", LINEAR_DELTA_CASES)
def test_module_equals_merged_delta(case, model_name, hf_models, specs):
    model, spec = hf_models[model_name], specs[model_name]
    adapter = make(case, spec, seed=11)
    ids = random_ids(1)
    with torch.no_grad():
        base = model(ids).logits
        with attach(model, adapter):
            ours = model(ids).logits
        after = model(ids).logits
    merged = merged_logits(model, adapter, ids)
    assert (ours - base).abs().max() > 0.05, "the adapter must visibly change the logits"
    assert (ours - merged).abs().max().item() <= 1e-5
    assert torch.equal(after, base), "detach must restore the model exactly"


@pytest.mark.parametrize("case", EXACT_LORA_CASES)
def test_exact_lora_form(case, model_name, specs):
    adapter = make(case, specs[model_name], seed=3)
    adapter.validate(specs[model_name])
    for key in adapter.targets:
        a, b = adapter.lora_factors(key)
        fan_in, fan_out = specs[model_name].module_shape(key[1])
        assert a.shape == (adapter.rank, fan_in) and b.shape == (fan_out, adapter.rank)
        torch.testing.assert_close(b @ a, adapter.delta(key), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["bat", "loretta_adp"])
def test_no_exact_lora_form_is_a_clear_error(case, specs):
    adapter = make(case, specs["mha"])
    with pytest.raises(NoExactLoRAError, match="no exact LoRA form.*native path"):
        adapter.lora_factors(adapter.targets[0])


@pytest.mark.parametrize("orientation", ["heads_in", "heads_out"])
def test_lorta_gqa_kv_update_is_group_mean_of_query_head_updates(orientation, specs):
    """tenfold's GQA definition: key/value head g gets the mean of the updates its query heads would get on an
    equivalent multi-head model (computed here independently, from the fork's per-head formula)."""
    spec = specs["gqa"]
    adapter = make("lorta_heads_in", spec, seed=5, orientation=orientation)
    adapter.validate(spec)
    a, b = adapter.tensor("lora_A"), adapter.tensor("lora_B")
    c_l, c_h, c_m = adapter.tensor("lora_C_l"), adapter.tensor("lora_C_h"), adapter.tensor("lora_C_m")
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    layer, m = 2, 1  # k_proj
    per_head = [a @ torch.diag(c_h[h] * c_m[m] * c_l[layer]) @ b for h in range(spec.num_heads)]  # [d, d_h] each
    full = torch.cat(per_head, dim=1) * scale  # the fork's delta for an MHA model: [d, H*d_h]
    as_linear = full.t() if orientation == "heads_out" else full  # nn.Linear layout [out, in]
    heads = as_linear.reshape(spec.num_heads, spec.head_dim, -1)
    expected = heads.reshape(spec.num_kv_heads, spec.group_size, spec.head_dim, -1).mean(1).reshape(-1, heads.shape[-1])
    torch.testing.assert_close(adapter.delta((layer, "k_proj")), expected, rtol=1e-5, atol=1e-6)
    # the query projection keeps every head: exactly the fork's formula
    q_full = torch.cat([a @ torch.diag(c_h[h] * c_m[0] * c_l[layer]) @ b for h in range(spec.num_heads)], dim=1) * scale
    torch.testing.assert_close(adapter.delta((layer, "q_proj")), q_full.t() if orientation == "heads_out" else q_full,
                               rtol=1e-5, atol=1e-6)


def test_attaching_twice_is_refused(hf_models, specs):
    model = hf_models["mha"]
    first, second = make("lora", specs["mha"], seed=1), make("miss", specs["mha"], seed=2)
    with attach(model, first):
        with pytest.raises(ValueError, match="already carries an adapter"):
            attach(model, second)
