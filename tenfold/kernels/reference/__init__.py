"""Torch reference ops of the Triton kernels in `tenfold.kernels.triton`: the same names and signatures, plain torch ops
(the padded ops of `tenfold.kernels` over the segments' tiles). They run on any device, need no triton, and are the
reference the kernels are tested against. Shrinks return u [1, T, r] fp32 (zeros outside the bucket)."""

from .bat import bat_apply
from .bottleneck import bottleneck_apply
from .lorta import (lorta_heads_in_apply, lorta_heads_in_expand, lorta_heads_in_shrink, lorta_heads_out_apply,
                    lorta_heads_out_expand, lorta_heads_out_shrink)
from .lowrank import lowrank_apply, lowrank_expand, lowrank_shrink
from .miss import miss_apply, miss_expand, miss_shrink

__all__ = ["bat_apply", "bottleneck_apply", "lorta_heads_in_apply", "lorta_heads_in_expand", "lorta_heads_in_shrink",
           "lorta_heads_out_apply", "lorta_heads_out_expand", "lorta_heads_out_shrink", "lowrank_apply",
           "lowrank_expand", "lowrank_shrink", "miss_apply", "miss_expand", "miss_shrink"]
