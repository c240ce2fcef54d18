"""MiSS (default and mini): an adapter-independent block-sum shrink, then a gathered expand.

The shrink is the LoRA A of the block sum (A[k, j] = 1 iff k % r == j), generated in registers: it reads x only. The
expand reads the row's block D [r, out], or the mini block [r, mini_r] modulo its width: the product repeats along the
output without a tiled copy of the block.
"""

from __future__ import annotations

import torch

from ..launch import LaunchConfig
from ..segments import Segments
from .segmented import expand, shrink


def miss_shrink(x: torch.Tensor, rank: int, seg: Segments, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [T, in] -> u [splits, T, r] fp32: the sum of x's width-r blocks (the last zero-padded) for the bucket's
    tokens; the shrink is u.sum(0)."""
    return shrink(x, None, seg, rank=rank, config=config)


def miss_expand(u: torch.Tensor, d: torch.Tensor, seg: Segments, output: torch.Tensor,
                config: LaunchConfig | None = None) -> None:
    """output [T, out] += u.sum(0) @ D[row], D [R, r, out] or mini [R, r, mini_r] with mini_r dividing out."""
    expand(u, d, seg, output, config=config)


def miss_apply(x: torch.Tensor, d: torch.Tensor, seg: Segments, output: torch.Tensor,
               config: LaunchConfig | None = None) -> None:
    """output [T, out] += block_sum(x, r) @ D[row] (mini blocks repeated along the output)."""
    miss_expand(miss_shrink(x, d.shape[1], seg, config), d, seg, output, config)
