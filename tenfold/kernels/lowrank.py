"""Low-rank apply (lora, and loretta_rep once its TT cores are contracted): y += (x A) B per chunk."""

from __future__ import annotations

import torch


def lowrank_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [C, G, in], A [C, in, r] -> [C, G, r]."""
    return torch.bmm(x, a)


def lowrank_expand(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h [C, G, r], B [C, r, out] (scaling folded in) -> [C, G, out]."""
    return torch.bmm(h, b)
