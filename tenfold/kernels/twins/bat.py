"""Torch twin of `tenfold.kernels.triton.bat` (same names and signatures; `config` is ignored)."""

from __future__ import annotations

import torch

from ..bat import bat_apply as padded_apply, bat_transform
from ..launch import LaunchConfig
from ..segments import Segments
from .tiles import tile_layout


def bat_apply(x: torch.Tensor, d: torch.Tensor, w0: torch.Tensor, seg: Segments, output: torch.Tensor,
              config: LaunchConfig | None = None) -> None:
    """x [T, in], D [R, out/r, r, r], W0 [out, in] -> output [T, out] += dy. Materialises the transformed inputs
    z [n_tiles * M, out/r, in/r, r]: a reference, not a fast path."""
    tiles = tile_layout(seg)
    z = bat_transform(tiles.gather(x, d.dtype), tiles.table(d))
    dy = padded_apply(z.reshape(-1, *z.shape[2:]), w0.to(d.dtype))
    tiles.accumulate(output, dy.view(*tiles.tokens.shape, -1))
