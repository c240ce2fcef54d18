"""LoRETTA adp apply: s * (act(z W_down + b_down) W_up + b_up) per chunk (TT cores contracted at slot activation)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def bottleneck(z: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor,
               scaling: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """z [C, G, d], W_down [C, d, b], b_down [C, b], W_up [C, b, d], b_up [C, d], scaling [C] -> [C, G, d]."""
    h = act(torch.baddbmm(b_down[:, None], z, w_down))
    return torch.baddbmm(b_up[:, None], h, w_up) * scaling[:, None, None]
