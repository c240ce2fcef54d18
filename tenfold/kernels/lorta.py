"""LoRTA apply: one shared shrink per token, then a per-(layer, matrix) scaled, head-structured expand.

heads_out (heads index the output rows): u = x A [r], shared by q, k and v; dy_h = (u * c_lm * C_h[h]) B, one
batched matmul for all heads of q, k and v together (the fused qkv output is their heads side by side).
heads_in (heads index the input columns): u = sum_h C_h[h] * (B x_h) [r], shared by q, k and v; dy = (u * c_lm) A^T.
c_lm = C_l[layer] * C_m[matrix] * alpha / r. For grouped-query k/v the head factors arrive group-averaged.
"""

from __future__ import annotations

import torch


def lorta_heads_out_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x [C, G, d], A [C, d, r] -> u [C, G, r]."""
    return torch.bmm(x, a)


def lorta_heads_in_shrink(x: torch.Tensor, b_t: torch.Tensor, c_h: torch.Tensor) -> torch.Tensor:
    """x [C, G, H * d_h], B^T [C, d_h, r], C_h [C, H, r] -> u [C, G, r]: the head-weighted sum of B x_h."""
    chunks, rows, _ = x.shape
    heads, head_dim = c_h.shape[1], b_t.shape[1]
    per_head = torch.bmm(x.reshape(chunks, rows * heads, head_dim), b_t).view(chunks, rows, heads, -1)
    return (per_head * c_h[:, None]).sum(2)


def lorta_heads_out_expand(u: torch.Tensor, head_weights: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """u [C, G, r], head weights c_lm * C_h [C, n_heads, r] (heads of one or several matrices), B [C, r, d_h]
    -> [C, G, n_heads * d_h]."""
    chunks, rows, rank = u.shape
    scaled = u[:, :, None, :] * head_weights[:, None]  # [C, G, n_heads, r]
    return torch.bmm(scaled.reshape(chunks, -1, rank), b).view(chunks, rows, -1)


def lorta_heads_in_expand(u: torch.Tensor, c_lm: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """u [C, G, r], c_lm [C, r], A^T [C, r, out] (k/v rows group-averaged) -> [C, G, out]."""
    return torch.bmm(u * c_lm[:, None], a_t)
