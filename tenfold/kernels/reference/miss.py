"""Torch reference ops of `tenfold.kernels.triton.miss` (same names and signatures; `config` is ignored)."""

from __future__ import annotations

import torch

from ..launch import LaunchConfig
from ..miss import miss_expand as padded_expand, miss_shrink as padded_shrink
from ..segments import Segments
from .tiles import tile_layout


def miss_shrink(x: torch.Tensor, rank: int, seg: Segments, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [T, in] -> u [1, T, r] fp32: the block sum of every token (it does not depend on the adapter)."""
    return padded_shrink(x.float(), rank)[None]


def miss_expand(u: torch.Tensor, d: torch.Tensor, seg: Segments, output: torch.Tensor,
                config: LaunchConfig | None = None) -> None:
    """output [T, out] += u.sum(0) @ D[row], D [R, r, out] or mini [R, r, mini_r] with mini_r dividing out."""
    tiles = tile_layout(seg)
    tiles.accumulate(output, padded_expand(tiles.gather(u.sum(0), d.dtype), tiles.table(d), output.shape[1]))


def miss_apply(x: torch.Tensor, d: torch.Tensor, seg: Segments, output: torch.Tensor,
               config: LaunchConfig | None = None) -> None:
    """output [T, out] += block_sum(x, r) @ D[row] (mini blocks repeated along the output)."""
    miss_expand(miss_shrink(x, d.shape[1], seg), d, seg, output)
