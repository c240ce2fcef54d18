"""Bat: dy_i = sum_j (W0_ij + I) (D_i x_j), the block transform and the second pass over W0 fused in one kernel.

W0 [out, in] is cut into r x r blocks W0_ij (i: output block, j: input block); each adapter row holds D [out/r, r, r].
One program owns a tile and an output block i: it keeps D_i in registers and walks the input blocks j, transforming
x_j (z = x_j D_i^T) and multiplying z by W0_ij^T at once, so the transformed inputs z [T, out/r, in/r, r] (what the
padded torch op materialises, out/r times the size of x) never leave the chip. The identity term is added to the fp32
accumulator rather than to the loaded W0 block: 1 + W0_ij in bf16 would round away most of W0's diagonal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import DEFAULT, LaunchConfig
from ..segments import Segments
from .common import accumulate, dot_precision, lanes, padded, tile_tokens


@triton.jit
def _bat_kernel(x_ptr, d_ptr, w_ptr, out_ptr, tiles_ptr, order_ptr,
                block, in_blocks,
                stride_xt, stride_xk, stride_dr, stride_di, stride_da, stride_db, stride_wo, stride_wi,
                stride_ot, stride_on,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    tile, i = tl.program_id(0), tl.program_id(1)
    row, tokens, live = tile_tokens(tiles_ptr, order_ptr, tile, BLOCK_M)
    if row < 0:
        return
    a, in_block = lanes(block, BLOCK_R)
    square = in_block[:, None] & in_block[None, :]
    # D_i^T [b, a], so that z = x_j @ D_i^T gives z[a] = sum_b D_i[a, b] x_j[b]
    d_t = tl.load(d_ptr + row * stride_dr + i * stride_di + a[None, :] * stride_da + a[:, None] * stride_db,
                  mask=square, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(in_blocks):
        x_j = tl.load(x_ptr + tokens[:, None] * stride_xt + (j * block + a)[None, :] * stride_xk,
                      mask=live[:, None] & in_block[None, :], other=0.0)
        z = tl.dot(x_j.to(d_t.dtype), d_t, input_precision=PRECISION)
        # W0_ij^T [a, a']: input column j*r + a, output row i*r + a'
        w_t = tl.load(w_ptr + (i * block + a)[None, :] * stride_wo + (j * block + a)[:, None] * stride_wi,
                      mask=square, other=0.0)
        acc += tl.dot(z.to(w_t.dtype), w_t, input_precision=PRECISION) + z
    accumulate(out_ptr, tokens, i * block + a, stride_ot, stride_on, acc, live[:, None] & in_block[None, :])


def bat_apply(x: torch.Tensor, d: torch.Tensor, w0: torch.Tensor, seg: Segments, output: torch.Tensor,
              config: LaunchConfig | None = None) -> None:
    """x [T, in], D [R, out/r, r, r], W0 [out, in] (the module's frozen rows) -> output [T, out] += dy."""
    config = config or DEFAULT
    if seg.max_tiles == 0:
        return
    out_blocks, block = d.shape[1], d.shape[3]
    _bat_kernel[(seg.max_tiles, out_blocks)](
        x, d, w0, output, seg.tiles, seg.token_order, block, x.shape[1] // block,
        *x.stride(), *d.stride(), *w0.stride(), *output.stride(),
        BLOCK_M=seg.block_m, BLOCK_R=padded(block), PRECISION=dot_precision(torch.promote_types(d.dtype, w0.dtype)),
        num_warps=config.num_warps or 4)
