"""LoRTA: one shared shrink per token, then a per-(layer, matrix) scaled, head-structured expand.

heads_out: u = x A[row] (the segmented shrink), shared by q, k and v; head h of the output gets
(u * W[row, h]) B[row] with W the head weights c_lm * C_h of the layer (q|k|v heads side by side for the fused
projection, C_h group-averaged for grouped-query k/v), B [r, d_h] shared by all heads: a program loads B once and
loops over a few heads.
heads_in: u = sum_h C_h[row, h] * (x_h B^T[row]) (a program loads B^T once and loops over a few heads; splits over
the heads when tiles are few), then output += (u * c_lm[row]) A^T[row]: the segmented expand with a scaled prologue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import DEFAULT, LaunchConfig
from ..segments import Segments
from .common import (accumulate, dot_precision, lanes, load_shrunk, padded, reduction_splits, shrunk_buffer,
                     store_shrunk, tile_tokens)
from .segmented import expand, shrink


@triton.jit
def _heads_out_expand_kernel(u_ptr, w_ptr, b_ptr, out_ptr, tiles_ptr, order_ptr,
                             rank, num_heads, head_dim,
                             stride_us, stride_ut, stride_un, stride_wr, stride_wh, stride_wn,
                             stride_br, stride_bk, stride_bd, stride_ot, stride_on,
                             SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_D: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, PRECISION: tl.constexpr):
    tile, head_block = tl.program_id(0), tl.program_id(1)
    row, tokens, live = tile_tokens(tiles_ptr, order_ptr, tile, BLOCK_M)
    if row < 0:
        return
    r, in_rank = lanes(rank, BLOCK_R)
    d, in_head = lanes(head_dim, BLOCK_D)
    u = load_shrunk(u_ptr, tokens, live, r, in_rank, stride_us, stride_ut, stride_un, SPLITS)
    b = tl.load(b_ptr + row * stride_br + r[:, None] * stride_bk + d[None, :] * stride_bd,
                mask=in_rank[:, None] & in_head[None, :], other=0.0)
    for i in range(HEADS_PER_PROGRAM):
        h = head_block * HEADS_PER_PROGRAM + i
        # past the last head (a partial head block): compute on the last head, store nothing
        w = tl.load(w_ptr + row * stride_wr + tl.minimum(h, num_heads - 1) * stride_wh + r * stride_wn,
                    mask=in_rank, other=0.0)
        delta = tl.dot((u * w.to(tl.float32)[None, :]).to(b.dtype), b, input_precision=PRECISION)
        cols = h * head_dim + d
        accumulate(out_ptr, tokens, cols, stride_ot, stride_on, delta,
                   live[:, None] & (in_head & (cols < num_heads * head_dim))[None, :])


@triton.jit
def _heads_in_shrink_kernel(x_ptr, bt_ptr, ch_ptr, u_ptr, tiles_ptr, order_ptr,
                            rank, num_heads, head_dim, heads_per_split,
                            stride_xt, stride_xk, stride_br, stride_bd, stride_bn, stride_cr, stride_ch, stride_cn,
                            stride_us, stride_ut, stride_un,
                            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr):
    tile, split = tl.program_id(0), tl.program_id(1)
    row, tokens, live = tile_tokens(tiles_ptr, order_ptr, tile, BLOCK_M)
    if row < 0:
        return
    r, in_rank = lanes(rank, BLOCK_R)
    d, in_head = lanes(head_dim, BLOCK_D)
    b_t = tl.load(bt_ptr + row * stride_br + d[:, None] * stride_bd + r[None, :] * stride_bn,
                  mask=in_head[:, None] & in_rank[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    h_begin = split * heads_per_split
    for h in range(h_begin, tl.minimum(h_begin + heads_per_split, num_heads)):
        x_h = tl.load(x_ptr + tokens[:, None] * stride_xt + (h * head_dim + d)[None, :] * stride_xk,
                      mask=live[:, None] & in_head[None, :], other=0.0)
        c_h = tl.load(ch_ptr + row * stride_cr + h * stride_ch + r * stride_cn, mask=in_rank, other=0.0)
        acc += tl.dot(x_h.to(b_t.dtype), b_t, input_precision=PRECISION) * c_h.to(tl.float32)[None, :]
    store_shrunk(u_ptr, split, tokens, live, r, in_rank, stride_us, stride_ut, stride_un, acc)


def lorta_heads_out_shrink(x: torch.Tensor, a: torch.Tensor, seg: Segments, config: LaunchConfig | None = None
                           ) -> torch.Tensor:
    """x [T, d], A [R, d, r] -> u [splits, T, r] fp32 partial sums, shared by every matrix reading x."""
    return shrink(x, a, seg, config=config)


def lorta_heads_out_expand(u: torch.Tensor, head_weights: torch.Tensor, b: torch.Tensor, seg: Segments,
                           output: torch.Tensor, config: LaunchConfig | None = None) -> None:
    """output [T, n_heads * d_h] += per head h: (u.sum(0) * head_weights[row, h]) @ B[row].
    head_weights [R, n_heads, r] (the layer's slice of the HW table: any strides), B [R, r, d_h]."""
    config = config or DEFAULT
    if seg.max_tiles == 0:
        return
    rank, head_dim = b.shape[1], b.shape[2]
    num_heads = head_weights.shape[1]
    heads_per_program = config.heads_per_program or min(8, num_heads)
    grid = (seg.max_tiles, triton.cdiv(num_heads, heads_per_program))
    _heads_out_expand_kernel[grid](
        u, head_weights, b, output, seg.tiles, seg.token_order, rank, num_heads, head_dim,
        *u.stride(), *head_weights.stride(), *b.stride(), *output.stride(),
        SPLITS=u.shape[0], BLOCK_M=seg.block_m, BLOCK_R=padded(rank), BLOCK_D=padded(head_dim),
        HEADS_PER_PROGRAM=heads_per_program, PRECISION=dot_precision(b.dtype), num_warps=config.num_warps or 4)


def lorta_heads_out_apply(x: torch.Tensor, a: torch.Tensor, head_weights: torch.Tensor, b: torch.Tensor,
                          seg: Segments, output: torch.Tensor, config: LaunchConfig | None = None) -> None:
    """output += the heads_out update of every head in head_weights (e.g. the fused q|k|v output)."""
    lorta_heads_out_expand(lorta_heads_out_shrink(x, a, seg, config), head_weights, b, seg, output, config)


def lorta_heads_in_shrink(x: torch.Tensor, b_t: torch.Tensor, c_h: torch.Tensor, seg: Segments,
                          config: LaunchConfig | None = None) -> torch.Tensor:
    """x [T, H * d_h], B^T [R, d_h, r], C_h [R, H, r] -> u [splits, T, r] fp32 partials of sum_h C_h[h] * (B x_h)."""
    config = config or DEFAULT
    num_tokens = x.shape[0]
    head_dim, rank = b_t.shape[1], b_t.shape[2]
    num_heads = c_h.shape[1]
    splits = reduction_splits(x.device, seg.max_tiles, num_heads, config)
    heads_per_split = triton.cdiv(num_heads, splits)
    splits = triton.cdiv(num_heads, heads_per_split)
    u = shrunk_buffer(splits, num_tokens, rank, x.device)
    if seg.max_tiles == 0:
        return u
    _heads_in_shrink_kernel[(seg.max_tiles, splits)](
        x, b_t, c_h, u, seg.tiles, seg.token_order, rank, num_heads, head_dim, heads_per_split,
        *x.stride(), *b_t.stride(), *c_h.stride(), *u.stride(),
        BLOCK_M=seg.block_m, BLOCK_R=padded(rank), BLOCK_D=padded(head_dim), PRECISION=dot_precision(b_t.dtype),
        num_warps=config.num_warps or 4)
    return u


def lorta_heads_in_expand(u: torch.Tensor, c_lm: torch.Tensor, a_t: torch.Tensor, seg: Segments,
                          output: torch.Tensor, config: LaunchConfig | None = None) -> None:
    """output [T, out] += (u.sum(0) * c_lm[row]) @ A^T[row]; c_lm [R, r] (the layer's and matrix's slice of the
    C_lm table), A^T [R, r, out] (group-averaged rows for grouped-query k/v)."""
    expand(u, a_t, seg, output, u_scale=c_lm, config=config)


def lorta_heads_in_apply(x: torch.Tensor, b_t: torch.Tensor, c_h: torch.Tensor, c_lm: torch.Tensor,
                         a_t: torch.Tensor, seg: Segments, output: torch.Tensor,
                         config: LaunchConfig | None = None) -> None:
    """output += the heads_in update of one matrix."""
    lorta_heads_in_expand(lorta_heads_in_shrink(x, b_t, c_h, seg, config), c_lm, a_t, seg, output, config)
