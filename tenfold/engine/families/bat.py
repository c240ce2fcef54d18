"""Bat: per (layer, module) one D_i [r, r] per output block; the apply makes a second pass over the frozen weight,
for the bucket's tokens only."""

from __future__ import annotations

from ...adapters.base import key_name
from ...kernels.bat import bat_apply, bat_transform
from .base import PerModuleBucket
from .miss import block_rows


class BatBucket(PerModuleBucket):
    family = "bat"

    @classmethod
    def signature_of(cls, adapter):
        return "bat", adapter.rank, tuple(adapter.targets)

    def row_tensors(self, adapter):
        return block_rows(adapter)

    def apply(self, call, group):
        targeted = self.targeted(call)
        if not targeted:
            return
        x = group.gather(call.x_compute)
        for m in targeted:
            z = bat_transform(x, self.rows(f"D.{key_name((call.layer, m))}", group))
            z = group.real_rows(z)
            call.add_rows(m, bat_apply(z, call.weight_of(m)))
