"""Torch reference ops of `tenfold.kernels.triton.lowrank` (same names and signatures; `config` is ignored)."""

from __future__ import annotations

import torch

from ..launch import LaunchConfig
from ..lowrank import lowrank_expand as padded_expand, lowrank_shrink as padded_shrink
from ..segments import Segments
from .tiles import tile_layout


def lowrank_shrink(x: torch.Tensor, a: torch.Tensor, seg: Segments, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [T, in], A [R, in, r] -> u [1, T, r] fp32 (zeros for tokens outside the bucket)."""
    tiles = tile_layout(seg)
    return tiles.scatter(padded_shrink(tiles.gather(x, a.dtype), tiles.table(a)))[None]


def lowrank_expand(u: torch.Tensor, b: torch.Tensor, seg: Segments, output: torch.Tensor,
                   config: LaunchConfig | None = None) -> None:
    """output [T, out] += u.sum(0) @ B[row] for the bucket's tokens; B [R, r, out]."""
    tiles = tile_layout(seg)
    tiles.accumulate(output, padded_expand(tiles.gather(u.sum(0), b.dtype), tiles.table(b)))


def lowrank_apply(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, seg: Segments, output: torch.Tensor,
                  config: LaunchConfig | None = None) -> None:
    """output [T, out] += (x A[row]) B[row] for the bucket's tokens."""
    lowrank_expand(lowrank_shrink(x, a, seg), b, seg, output)
