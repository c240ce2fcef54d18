"""The segmented shrink and expand that lora, loretta_rep, MiSS, LoRTA heads_in and loretta_adp share.

shrink: u[t] = x[t] @ A[row(t)] [r], or, for MiSS, the block sum of x[t] (A[k, j] = 1 iff k % r == j, generated in
registers, no table read). The reduction over the input may be split over several programs per tile (decode steps
have few tiles); each split writes its own partial row of u [splits, T, r], and the expand sums them.
expand: output[t] += epilogue(prologue(u[t]) @ B[row(t)]) for the bucket's tokens, with
  prologue(u) = act(u + u_bias[row]) * u_scale[row]   (loretta_adp: bias and activation; LoRTA heads_in: c_lm)
  epilogue(y) = (y + out_bias[row]) * out_scale[row]  (loretta_adp: up bias and scaling)
and B's columns read modulo its width (a MiSS mini block repeats along the output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import DEFAULT, LaunchConfig
from ..segments import Segments
from .common import (ACTIVATIONS, accumulate, activate, dot_precision, lanes, load_shrunk, padded, reduction_splits,
                     shrunk_buffer, store_shrunk, tile_tokens, unit_stride_rows)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, tiles_ptr, order_ptr,
                   in_features, rank, columns_per_split,
                   stride_xt, stride_xk, stride_ar, stride_ak, stride_an, stride_us, stride_ut, stride_un,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_SUM: tl.constexpr, PRECISION: tl.constexpr):
    tile, split = tl.program_id(0), tl.program_id(1)
    row, tokens, live = tile_tokens(tiles_ptr, order_ptr, tile, BLOCK_M)
    if row < 0:
        return
    r, in_rank = lanes(rank, BLOCK_R)
    k_begin = split * columns_per_split
    k_end = tl.minimum(k_begin + columns_per_split, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < k_end  # past the input: MiSS's zero padding of the last block
        xk = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xk,
                     mask=live[:, None] & in_k[None, :], other=0.0)
        if BLOCK_SUM:
            ak = ((k[:, None] % rank) == r[None, :]).to(xk.dtype)
        else:
            ak = tl.load(a_ptr + row * stride_ar + k[:, None] * stride_ak + r[None, :] * stride_an,
                         mask=in_k[:, None] & in_rank[None, :], other=0.0)
        acc += tl.dot(xk.to(ak.dtype), ak, input_precision=PRECISION)
    store_shrunk(u_ptr, split, tokens, live, r, in_rank, stride_us, stride_ut, stride_un, acc)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, out_ptr, tiles_ptr, order_ptr, u_bias_ptr, u_scale_ptr, out_bias_ptr, out_scale_ptr,
                   rank, out_features, b_columns,
                   stride_us, stride_ut, stride_un, stride_br, stride_bk, stride_bn, stride_ot, stride_on,
                   stride_u_bias, stride_u_scale, stride_out_bias, stride_out_scale,
                   SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACT: tl.constexpr, HAS_U_BIAS: tl.constexpr, HAS_U_SCALE: tl.constexpr,
                   HAS_OUT_BIAS: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, PRECISION: tl.constexpr):
    tile, block = tl.program_id(0), tl.program_id(1)
    row, tokens, live = tile_tokens(tiles_ptr, order_ptr, tile, BLOCK_M)
    if row < 0:
        return
    r, in_rank = lanes(rank, BLOCK_R)
    u = load_shrunk(u_ptr, tokens, live, r, in_rank, stride_us, stride_ut, stride_un, SPLITS)
    if HAS_U_BIAS:
        u += tl.load(u_bias_ptr + row * stride_u_bias + r, mask=in_rank, other=0.0).to(tl.float32)[None, :]
    u = activate(u, ACT)  # padded rank lanes may turn nonzero (sigmoid); B's padded rows are zero
    if HAS_U_SCALE:
        u *= tl.load(u_scale_ptr + row * stride_u_scale + r, mask=in_rank, other=0.0).to(tl.float32)[None, :]
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_out = n < out_features
    col = n % b_columns
    b = tl.load(b_ptr + row * stride_br + r[:, None] * stride_bk + col[None, :] * stride_bn,
                mask=in_rank[:, None] & in_out[None, :], other=0.0)
    delta = tl.dot(u.to(b.dtype), b, input_precision=PRECISION)
    if HAS_OUT_BIAS:
        delta += tl.load(out_bias_ptr + row * stride_out_bias + col, mask=in_out, other=0.0).to(tl.float32)[None, :]
    if HAS_OUT_SCALE:
        delta *= tl.load(out_scale_ptr + row * stride_out_scale).to(tl.float32)
    accumulate(out_ptr, tokens, n, stride_ot, stride_on, delta, live[:, None] & in_out[None, :])


def shrink(x: torch.Tensor, a: torch.Tensor | None, seg: Segments, *, rank: int | None = None,
           config: LaunchConfig | None = None) -> torch.Tensor:
    """x [T, in], A [R, in, r] -> u [splits, T, r] fp32 (the shrink is u.sum(0); rows of tokens outside the bucket
    are undefined). With a=None and rank=r: the MiSS block sum of x, the same for every row."""
    config = config or DEFAULT
    block_sum = a is None
    rank = rank if block_sum else a.shape[2]
    num_tokens, in_features = x.shape
    block_k = config.block_k or min(128, padded(in_features))
    steps = triton.cdiv(in_features, block_k)
    splits = reduction_splits(x.device, seg.max_tiles, steps, config)
    columns_per_split = triton.cdiv(steps, splits) * block_k
    splits = triton.cdiv(in_features, columns_per_split)  # no split left without columns
    u = shrunk_buffer(splits, num_tokens, rank, x.device)
    if seg.max_tiles == 0:
        return u
    a_strides = (0, 0, 0) if block_sum else a.stride()
    _shrink_kernel[(seg.max_tiles, splits)](
        x, x if block_sum else a, u, seg.tiles, seg.token_order, in_features, rank, columns_per_split,
        *x.stride(), *a_strides, *u.stride(),
        BLOCK_M=seg.block_m, BLOCK_R=padded(rank), BLOCK_K=block_k, BLOCK_SUM=block_sum,
        PRECISION=dot_precision(x.dtype if block_sum else a.dtype), num_warps=config.num_warps or 4)
    return u


def expand(u: torch.Tensor, b: torch.Tensor, seg: Segments, output: torch.Tensor, *,
           u_bias: torch.Tensor | None = None, act: str = "linear", u_scale: torch.Tensor | None = None,
           out_bias: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
           config: LaunchConfig | None = None) -> None:
    """output[t] += ((act(u[t] + u_bias[row]) * u_scale[row]) @ B[row] + out_bias[row]) * out_scale[row] for the
    bucket's tokens (absent terms skipped). u [splits, T, r], B [R, r, cols] with cols dividing out (read modulo
    cols), u_bias / u_scale [R, r], out_bias [R, cols], out_scale [R], output [T, out] (a column slice works)."""
    config = config or DEFAULT
    if seg.max_tiles == 0:
        return
    rank, out_features = b.shape[1], output.shape[1]
    block_n = config.block_n or min(128, padded(out_features))
    optional = [unit_stride_rows(t) if t is not None else None for t in (u_bias, u_scale, out_bias)]
    pointers = [t if t is not None else b for t in (*optional, out_scale)]
    strides = [t.stride(0) if t is not None else 0 for t in (*optional, out_scale)]
    _expand_kernel[(seg.max_tiles, triton.cdiv(out_features, block_n))](
        u, b, output, seg.tiles, seg.token_order, *pointers, rank, out_features, b.shape[2],
        *u.stride(), *b.stride(), *output.stride(), *strides,
        SPLITS=u.shape[0], BLOCK_M=seg.block_m, BLOCK_R=padded(rank), BLOCK_N=block_n, ACT=ACTIVATIONS[act],
        HAS_U_BIAS=u_bias is not None, HAS_U_SCALE=u_scale is not None, HAS_OUT_BIAS=out_bias is not None,
        HAS_OUT_SCALE=out_scale is not None, PRECISION=dot_precision(b.dtype), num_warps=config.num_warps or 4)
