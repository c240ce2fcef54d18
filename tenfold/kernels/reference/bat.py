"""Torch reference ops of `tenfold.kernels.triton.bat` (same names and signatures; `config` is ignored)."""

from __future__ import annotations

import torch

from ..bat import bat_delta
from ..launch import LaunchConfig
from ..segments import Segments
from .tiles import tile_layout


def bat_apply(x: torch.Tensor, d: torch.Tensor, w0: torch.Tensor, seg: Segments, output: torch.Tensor,
              config: LaunchConfig | None = None) -> None:
    """x [T, in], D [R, out/r, r, r], W0 [out, in] -> output [T, out] += dy."""
    tiles = tile_layout(seg)
    table = tiles.table(d)
    d_t = table.permute(0, 3, 1, 2).reshape(table.shape[0], table.shape[-1], -1)  # `bat_table` of every tile
    dy = bat_delta(tiles.gather(x, d.dtype), d_t, w0.to(d.dtype))
    tiles.accumulate(output, dy.view(*tiles.tokens.shape, -1))
