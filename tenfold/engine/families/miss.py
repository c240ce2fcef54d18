"""MiSS (default and mini): per (layer, module) the shared block D [r, out] or mini block [r, mini_r].

The block-sum shrink does not depend on the adapter: it is computed once per layer call for all of the bucket's
tokens and shared by the sub-modules that read the same input (q, k, v; gate, up).
"""

from __future__ import annotations

from ...adapters.base import key_name
from ...kernels.miss import miss_expand, miss_shrink
from .base import PerModuleBucket


def block_rows(adapter) -> dict:
    """One table per (layer, module): the module's miss_block (MiSS D or mini block, Bat's D_i stack)."""
    return {f"D.{key_name(key)}": adapter.block(key) for key in adapter.targets}


class MissBucket(PerModuleBucket):
    family = "miss"

    def __init__(self, signature, spec, dtype, device):
        super().__init__(signature, spec, dtype, device)
        _, self.rank, self.variant, self.mini_r, _ = signature

    @classmethod
    def signature_of(cls, adapter):
        return "miss", adapter.rank, adapter.config["variant"], adapter.config.get("mini_r"), tuple(adapter.targets)

    def row_tensors(self, adapter):
        return block_rows(adapter)

    def apply(self, call, group):
        targeted = self.targeted(call)
        if not targeted:
            return
        u = group.gather(miss_shrink(call.x_compute, self.rank))
        for m in targeted:
            d = self.rows(f"D.{key_name((call.layer, m))}", group)
            call.add(m, group, miss_expand(u, d, self.spec.module_shape(m)[1]))
