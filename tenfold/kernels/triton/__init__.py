"""Triton kernels of every family's apply over segmented tokens (`tenfold.kernels.segments`).

Each public function has a torch reference op of the same name and signature in `tenfold.kernels.reference`;
`tenfold.kernels.dispatch` picks one by device. Importing this package needs triton, not a GPU: under
TRITON_INTERPRET=1 (set before the import) the kernels run on CPU tensors.
"""

from ..launch import LaunchConfig
from .bat import bat_apply
from .bottleneck import bottleneck_apply, supports_activation
from .lorta import (lorta_heads_in_apply, lorta_heads_in_expand, lorta_heads_in_shrink, lorta_heads_out_apply,
                    lorta_heads_out_expand, lorta_heads_out_shrink)
from .lowrank import lowrank_apply, lowrank_expand, lowrank_shrink
from .miss import miss_apply, miss_expand, miss_shrink

__all__ = ["LaunchConfig", "bat_apply", "bottleneck_apply", "lorta_heads_in_apply", "lorta_heads_in_expand",
           "lorta_heads_in_shrink", "lorta_heads_out_apply", "lorta_heads_out_expand", "lorta_heads_out_shrink",
           "lowrank_apply", "lowrank_expand", "lowrank_shrink", "miss_apply", "miss_expand", "miss_shrink",
           "supports_activation"]
