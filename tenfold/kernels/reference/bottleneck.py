"""Torch reference ops of `tenfold.kernels.triton.bottleneck` (same names and signatures; `config` is ignored)."""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ..bottleneck import bottleneck
from ..launch import LaunchConfig
from ..segments import Segments
from .tiles import tile_layout


def bottleneck_apply(z: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                     b_up: torch.Tensor, scaling: torch.Tensor, seg: Segments, output: torch.Tensor, *, act: str,
                     config: LaunchConfig | None = None) -> None:
    """output [T, d_out] += s[row] * (act(z W_down[row] + b_down[row]) W_up[row] + b_up[row]); z may be a view of
    output (the post-adapter): every delta is computed before output is written."""
    tiles = tile_layout(seg)
    delta = bottleneck(tiles.gather(z, w_down.dtype), tiles.table(w_down), tiles.table(b_down), tiles.table(w_up),
                       tiles.table(b_up), tiles.table(scaling), ACT2FN[act])
    tiles.accumulate(output, delta)
