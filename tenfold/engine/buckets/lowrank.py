"""lora and loretta_rep: per (layer, module) A [in, r] and B [r, out] at the adapter's own rank.

loretta_rep's TT cores are contracted once, when the adapter takes a slot: applying the contracted factors is two
small matmuls per chunk, while contracting the cores per token costs one op per core and module on every step.
On CPU the two products run in tenfold's kernels (`tenfold.kernels.cpu`), straight from the tables into the output.
"""

from __future__ import annotations

import torch

from ...adapters.base import key_name
from ...kernels import cpu
from ...kernels.lowrank import lowrank_expand, lowrank_shrink
from .base import PerModuleBucket


class LowRankBucket(PerModuleBucket):
    family = "lowrank"
    has_cpu_kernels = True

    def __init__(self, signature, spec, dtype, device, shard=None, cpu_kernels=False):
        super().__init__(signature, spec, dtype, device, shard, cpu_kernels)
        self.rank = signature[1]

    @classmethod
    def signature_of(cls, adapter):
        return "lowrank", adapter.largest_lora_rank, tuple(adapter.targets)

    def row_tensors(self, adapter):
        tensors = {}
        for key in adapter.targets:
            a, b = adapter.lora_factors(key)  # A [r, in], B [out, r] with the scaling folded in
            a, b = a[:, self.shard.in_range(key[1])], b[self.shard.out_range(key[1])]  # this rank's columns
            pad = self.rank - a.shape[0]      # modules of lower rank are zero-padded (exact)
            # A kept as [r, in]: the shrink reads it through a transposed view, which the batched matmul runs faster
            # than the same product on an [in, r] table
            tensors[f"A_t.{key_name(key)}"] = torch.nn.functional.pad(a, (0, 0, 0, pad))
            tensors[f"B.{key_name(key)}"] = torch.nn.functional.pad(b.t(), (0, 0, 0, pad))
        return tensors

    def apply(self, call, group):
        if self.cpu_kernels:  # every targeted module in one call, straight into the output's columns
            targeted, tables = self.targeted(call), self.tables
            if not targeted:
                return
            names = [key_name((call.layer, m)) for m in targeted]
            cpu.lowrank_apply(call.x_rows, group.tokens, group.token_rows, [tables[f"A_t.{n}"] for n in names],
                              [tables[f"B.{n}"] for n in names], [call.output[:, call.modules[m]] for m in targeted])
            return
        x = group.gather(call.x_compute)
        for module in self.targeted(call):
            name = key_name((call.layer, module))
            h = lowrank_shrink(x, self.rows(f"A_t.{name}", group).transpose(1, 2))
            call.add(module, group, lowrank_expand(h, self.rows(f"B.{name}", group)))
