"""Torch reference ops of `tenfold.kernels.triton.lorta` (same names and signatures; `config` is ignored)."""

from __future__ import annotations

import torch

from .. import lorta as padded
from ..launch import LaunchConfig
from ..segments import Segments
from .lowrank import lowrank_shrink
from .tiles import tile_layout


def lorta_heads_out_shrink(x: torch.Tensor, a: torch.Tensor, seg: Segments, config: LaunchConfig | None = None
                           ) -> torch.Tensor:
    """x [T, d], A [R, d, r] -> u [1, T, r] fp32, shared by every matrix reading x."""
    return lowrank_shrink(x, a, seg)


def lorta_heads_out_expand(u: torch.Tensor, head_weights: torch.Tensor, b: torch.Tensor, seg: Segments,
                           output: torch.Tensor, config: LaunchConfig | None = None) -> None:
    """output [T, n_heads * d_h] += per head h: (u.sum(0) * head_weights[row, h]) @ B[row];
    head_weights [R, n_heads, r], B [R, r, d_h]."""
    tiles = tile_layout(seg)
    delta = padded.lorta_heads_out_expand(tiles.gather(u.sum(0), b.dtype), tiles.table(head_weights), tiles.table(b))
    tiles.accumulate(output, delta)


def lorta_heads_out_apply(x: torch.Tensor, a: torch.Tensor, head_weights: torch.Tensor, b: torch.Tensor,
                          seg: Segments, output: torch.Tensor, config: LaunchConfig | None = None) -> None:
    """output += the heads_out update of every head in head_weights (e.g. the fused q|k|v output)."""
    lorta_heads_out_expand(lorta_heads_out_shrink(x, a, seg), head_weights, b, seg, output)


def lorta_heads_in_shrink(x: torch.Tensor, b_t: torch.Tensor, c_h: torch.Tensor, seg: Segments,
                          config: LaunchConfig | None = None) -> torch.Tensor:
    """x [T, H * d_h], B^T [R, d_h, r], C_h [R, H, r] -> u [1, T, r] fp32: sum_h C_h[h] * (B x_h)."""
    tiles = tile_layout(seg)
    u = padded.lorta_heads_in_shrink(tiles.gather(x, b_t.dtype), tiles.table(b_t), tiles.table(c_h))
    return tiles.scatter(u)[None]


def lorta_heads_in_expand(u: torch.Tensor, c_lm: torch.Tensor, a_t: torch.Tensor, seg: Segments,
                          output: torch.Tensor, config: LaunchConfig | None = None) -> None:
    """output [T, out] += (u.sum(0) * c_lm[row]) @ A^T[row]; c_lm [R, r], A^T [R, r, out]."""
    tiles = tile_layout(seg)
    delta = padded.lorta_heads_in_expand(tiles.gather(u.sum(0), a_t.dtype), tiles.table(c_lm), tiles.table(a_t))
    tiles.accumulate(output, delta)


def lorta_heads_in_apply(x: torch.Tensor, b_t: torch.Tensor, c_h: torch.Tensor, c_lm: torch.Tensor,
                         a_t: torch.Tensor, seg: Segments, output: torch.Tensor,
                         config: LaunchConfig | None = None) -> None:
    """output += the heads_in update of one matrix."""
    lorta_heads_in_expand(lorta_heads_in_shrink(x, b_t, c_h, seg), c_lm, a_t, seg, output)
