"""Bat: per (layer, module) one D_i [r, r] per output block, stored as D^T [r, out]; the apply makes a second pass
over the frozen weight, for the bucket's tokens only (on CPU with tenfold's kernel, reading W0^T and the tables in the
model's dtype)."""

from __future__ import annotations

from ...adapters.base import key_name
from ...adapters.errors import where
from ...kernels import cpu
from ...kernels.bat import bat_delta, bat_table
from .base import PerModuleBucket


class BatBucket(PerModuleBucket):
    family = "bat"
    has_cpu_kernels = True

    @classmethod
    def signature_of(cls, adapter):
        return "bat", adapter.rank, tuple(adapter.targets)

    def frozen_weights(self):
        return set(self._targets)  # the second pass reads each targeted module's W0

    def row_tensors(self, adapter):
        tables = {}
        for key in adapter.targets:
            d_t = bat_table(adapter.block(key))  # [r, out]
            if self.shard.sharded:  # this rank's output blocks; its input blocks are its own columns of x and W0
                self.shard.require_blocks(key[1], adapter.rank, "Bat", where(adapter.source, key_name(key)))
                d_t = d_t[:, self.shard.out_range(key[1])]
            tables[f"Dt.{key_name(key)}"] = d_t
        return tables

    def apply(self, call, group):
        targeted = self.targeted(call)
        if not targeted:
            return
        if self.cpu_kernels:  # every targeted module in one call, straight into the output's columns
            names = [key_name((call.layer, m)) for m in targeted]
            cpu.bat_apply(call.x_rows, group.tokens, group.token_rows, [self.tables[f"Dt.{n}"] for n in names],
                          [call.weight_of(m).t() for m in targeted],  # the W0^T copies (SlotStore.frozen_transposed)
                          [call.output[:, call.modules[m]] for m in targeted])
            return
        x = group.gather(call.x_compute)
        for m in targeted:
            dy = bat_delta(x, self.rows(f"Dt.{key_name((call.layer, m))}", group), call.weight_of(m))
            call.add_rows(m, group.real_rows(dy.view(x.shape[0], x.shape[1], -1)))
