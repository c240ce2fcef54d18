"""Bat apply: dy_i = sum_j W0_ij (D_i x_j) + D_i sum_j x_j, a second pass over the frozen weight on block-transformed
inputs, run only for the tokens of bat adapters (W0 cut into r x r blocks, i: output block, j: input block)."""

from __future__ import annotations

import torch


def bat_transform(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [C, G, in], D [C, out/r, r, r] -> z [C, G, out/r, in/r, r] with z_ij = D_i x_j."""
    r = d.shape[-1]
    xb = x.reshape(*x.shape[:2], -1, r)                     # [C, G, in/r, r]
    return torch.einsum("ciab,cgjb->cgija", d, xb)


def bat_apply(z: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """z [n, out/r, in/r, r] (one row per token), W0 [out, in] -> dy [n, out]."""
    n, out_blocks, in_blocks, r = z.shape
    w_blocks = w0.reshape(out_blocks, r, in_blocks * r)     # W0's rows of output block i, all input columns
    second_pass = torch.bmm(w_blocks, z.permute(1, 2, 3, 0).reshape(out_blocks, in_blocks * r, n))  # [i, a, n]
    identity_term = z.sum(2)                                 # D_i sum_j x_j: [n, i, a]
    return (second_pass.permute(2, 0, 1) + identity_term).reshape(n, -1)
