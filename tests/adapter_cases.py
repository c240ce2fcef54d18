"""Random adapters of every family and variant, shared by the tests (fresh random non-zero factors per seed)."""

from __future__ import annotations

from tenfold.adapters import FAMILIES

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (family, create kwargs); every family and variant tenfold serves.
CASES = {
    "lora": ("lora", dict(target_modules=ALL_LINEAR, r=8)),
    "lorta_heads_in": ("lorta", dict(r=8, orientation="heads_in")),
    "lorta_heads_out": ("lorta", dict(r=8, orientation="heads_out")),
    "lorta_qv": ("lorta", dict(target_modules=["q_proj", "v_proj"], r=4, orientation="heads_out")),
    "loretta_rep": ("loretta_rep", dict(target_modules=["q_proj", "v_proj"], r=8, tensor_rank=5)),
    "loretta_adp": ("loretta_adp", dict(bottleneck_size=16, non_linearity="tanh")),
    # only one half of the fused gate_up projection: the other half must stay exactly the base model's
    "loretta_adp_up": ("loretta_adp", dict(target_modules=["up_proj"], bottleneck_size=16, non_linearity="relu")),
    "miss": ("miss", dict(target_modules=ALL_LINEAR, r=16)),
    "miss_mini": ("miss", dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], r=16, variant="mini",
                               mini_r=32)),
    "bat": ("bat", dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], r=16)),
}


def make(case: str, spec, seed: int = 0, **overrides):
    family, kwargs = CASES[case]
    return FAMILIES[family].create(spec, **{**kwargs, **overrides}, seed=seed)


def randomize_peft(peft_model, names, scale: float, seed: int) -> None:
    """PEFT initialises most adapters as a no-op (B = 0, miss_block = 0): fresh random non-zero factors instead, in
    the parameters whose names contain one of `names`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
