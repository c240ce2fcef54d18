"""MiSS (default and mini): per (layer, module) the shared block D [r, out] or mini block [r, mini_r].

The block-sum shrink does not depend on the adapter: it is computed once per layer call for all of the bucket's
tokens and shared by the sub-modules that read the same input (q, k, v; gate, up).
"""

from __future__ import annotations

from ...adapters.base import key_name
from ...adapters.errors import where
from ...kernels import cpu
from ...kernels.miss import miss_expand, miss_shrink
from .base import PerModuleBucket


class MissBucket(PerModuleBucket):
    family = "miss"
    has_cpu_kernels = True

    def __init__(self, signature, spec, dtype, device, shard=None, cpu_kernels=False):
        super().__init__(signature, spec, dtype, device, shard, cpu_kernels)
        _, self.rank, self.variant, self.mini_r, _ = signature

    @classmethod
    def signature_of(cls, adapter):
        return "miss", adapter.rank, adapter.config["variant"], adapter.config.get("mini_r"), tuple(adapter.targets)

    def row_tensors(self, adapter):
        tables = {}
        for key in adapter.targets:
            d = adapter.block(key)  # D [r, out] or mini [r, mini_r]
            if self.shard.sharded:
                module, context = key[1], where(adapter.source, key_name(key))
                # a row-parallel rank block-sums its own input columns: blocks must not straddle its shard
                self.shard.require_blocks(module, self.rank, "MiSS", context, sides=("input",))
                if self.variant == "mini":  # the mini block repeats along the output: the shard must hold periods
                    self.shard.require_blocks(module, self.mini_r, "MiSS mini", context, sides=("output",))
                else:
                    d = d[:, self.shard.out_range(module)]
            tables[f"D.{key_name(key)}"] = d
        return tables

    def apply(self, call, group):
        targeted = self.targeted(call)
        if not targeted:
            return
        if self.cpu_kernels:  # the expand straight from the tables into the output; a mini block repeats along it
            u = miss_shrink(call.x.index_select(0, group.tokens).float(), self.rank)
            cpu.lowrank_expand(u, group.tokens, group.token_rows,
                               [self.tables[f"D.{key_name((call.layer, m))}"] for m in targeted],
                               [call.output[:, call.modules[m]] for m in targeted])
            return
        u = group.gather(miss_shrink(call.x_compute, self.rank))
        for m in targeted:
            d = self.rows(f"D.{key_name((call.layer, m))}", group)
            columns = call.modules[m]
            call.add(m, group, miss_expand(u, d, columns.stop - columns.start))
