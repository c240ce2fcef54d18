"""loretta_adp: output[t] += s[row] * (act(z[t] W_down[row] + b_down[row]) W_up[row] + b_up[row]).

The down projection is the segmented shrink (split over the input, pre-activation partials); the bias and the
activation run in the expand's prologue once the partials are summed, the up bias and the scaling in its epilogue.
The two launches also make the post-adapter safe: its input z is the output it updates (down_proj), and the shrink
has read all of z before the expand writes any of it.
"""

from __future__ import annotations

import torch

from ..launch import LaunchConfig
from ..segments import Segments
from .common import ACTIVATIONS
from .segmented import expand, shrink


def supports_activation(act: str) -> bool:
    """Whether the kernel computes this activation (transformers' ACT2FN name); the reference op computes all."""
    return act in ACTIVATIONS


def bottleneck_apply(z: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                     b_up: torch.Tensor, scaling: torch.Tensor, seg: Segments, output: torch.Tensor, *, act: str,
                     config: LaunchConfig | None = None) -> None:
    """z [T, d], W_down [R, d, b], b_down [R, b], W_up [R, b, d_out], b_up [R, d_out], scaling [R],
    output [T, d_out] updated in place. For a pre-adapter pass a zeroed output and multiply it by W0 after."""
    if not supports_activation(act):
        raise ValueError(f"the bottleneck kernel has no activation {act!r}; it computes {sorted(ACTIVATIONS)}")
    h = shrink(z, w_down, seg, config=config)
    expand(h, w_up, seg, output, u_bias=b_down, act=act, out_bias=b_up, out_scale=scaling, config=config)
