"""lora and loretta_rep (TT cores contracted): output[t] += (x[t] A[row]) B[row], scaling folded into B."""

from __future__ import annotations

import torch

from ..launch import LaunchConfig
from ..segments import Segments
from .segmented import expand, shrink


def lowrank_shrink(x: torch.Tensor, a: torch.Tensor, seg: Segments, config: LaunchConfig | None = None
                   ) -> torch.Tensor:
    """x [T, in], A [R, in, r] -> u [splits, T, r] fp32 partial sums (the shrink is u.sum(0))."""
    return shrink(x, a, seg, config=config)


def lowrank_expand(u: torch.Tensor, b: torch.Tensor, seg: Segments, output: torch.Tensor,
                   config: LaunchConfig | None = None) -> None:
    """output [T, out] += u.sum(0) @ B[row] for the bucket's tokens; B [R, r, out]."""
    expand(u, b, seg, output, config=config)


def lowrank_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg: Segments, output: torch.Tensor,
                  config: LaunchConfig | None = None) -> None:
    """output [T, out] += (x A[row]) B[row] for the bucket's tokens."""
    lowrank_expand(lowrank_shrink(x, a, seg, config), b, seg, output, config)
