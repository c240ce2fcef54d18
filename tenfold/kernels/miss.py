"""MiSS apply: an adapter-independent block-sum shrink, then a gathered expand (mini: tiled along the output)."""

from __future__ import annotations

import torch

from ..adapters.miss.family import block_sum


def miss_shrink(x: torch.Tensor, r: int) -> torch.Tensor:
    """x [..., in] -> [..., r]: the sum of the width-r input blocks (zero-padded), the same for every adapter."""
    return block_sum(x, r)


def miss_expand(u: torch.Tensor, d: torch.Tensor, fan_out: int) -> torch.Tensor:
    """u [C, G, r], D [C, r, out] or mini [C, r, mini_r] -> [C, G, out] (a mini block repeats along the output)."""
    y = torch.bmm(u, d)
    if y.shape[-1] == fan_out:
        return y
    chunks, rows, mini = y.shape
    return y[:, :, None, :].expand(chunks, rows, fan_out // mini, mini).reshape(chunks, rows, fan_out)
