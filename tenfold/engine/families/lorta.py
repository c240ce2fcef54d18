"""LoRTA: one row holds the adapter's five factor matrices (KBs), shared by every layer.

Stored per row: the shrink factor (heads_out: A [d, r]; heads_in: B^T [d_h, r] with the head factors C_h), the
expand factor (heads_out: B [r, d_h]; heads_in: A^T [r, d] and its group-averaged k/v rows) and the scalings
c_lm = C_l[layer] * C_m[matrix] * alpha / r. heads_out stores them already multiplied into the head factors, per
layer and matrix ([L, heads, r], C_h group-averaged for grouped-query k/v, and q|k|v side by side for the fused
projection): a few KB per row that save several small ops per layer call. The shrink is computed once per layer
call and reused by q, k and v.
"""

from __future__ import annotations

import torch

from ...adapters.lorta.family import MATRICES
from ...kernels.lorta import (lorta_expand_heads_in, lorta_expand_heads_out, lorta_shrink_heads_in,
                              lorta_shrink_heads_out)
from .base import Bucket

QKV = "q_proj+k_proj+v_proj"  # the fused projection's sub-modules, as `LayerCall.modules` lists them


class LoRTABucket(Bucket):
    family = "lorta"

    def __init__(self, signature, spec, dtype, device):
        super().__init__(signature, spec, dtype, device)
        _, self.orientation, self.rank, modules = signature
        self.modules = frozenset(modules)

    @classmethod
    def signature_of(cls, adapter):
        return "lorta", adapter.config["orientation"], adapter.rank, tuple(sorted(adapter.config["target_modules"]))

    def row_tensors(self, adapter):
        a, b = adapter.tensor("lora_A"), adapter.tensor("lora_B")
        c_l, c_h, c_m = adapter.tensor("lora_C_l"), adapter.tensor("lora_C_h"), adapter.tensor("lora_C_m")
        group, r = self.spec.group_size, self.rank
        c_lm = c_l[:, None, :] * c_m[None] * adapter.scale  # [L, 4, r]
        if self.orientation == "heads_out":
            heads = {m: c_h.reshape(-1, group, r).mean(1) if m in ("k_proj", "v_proj") else c_h for m in self.modules}
            weights = {m: c_lm[:, MATRICES.index(m), None, :] * heads[m][None] for m in self.modules}  # [L, heads, r]
            tables = {"A": a, "B": b, **{f"HW.{m}": w for m, w in weights.items()}}
            if {"q_proj", "k_proj", "v_proj"} <= self.modules:
                tables[f"HW.{QKV}"] = torch.cat([weights[m] for m in ("q_proj", "k_proj", "v_proj")], 1)
            return tables
        a_kv = a.reshape(-1, group, b.shape[1], r).mean(1).reshape(-1, r)
        return {"B_t": b.t(), "C_h": c_h, "A_t": a.t(), "A_t_kv": a_kv.t(), "C_lm": c_lm}

    def adapts(self, layer, module):
        return module in self.modules

    def apply(self, call, group):
        targeted = [m for m in call.modules if m in self.modules]
        if not targeted:
            return
        x = group.gather(call.x_compute)
        if self.orientation == "heads_out":
            u = lorta_shrink_heads_out(x, self.rows("A", group))
            b = self.rows("B", group)
            fused = "+".join(call.modules)
            if len(targeted) == len(call.modules) and f"HW.{fused}" in self.tables:  # one expand over all heads
                call.add_fused(group, lorta_expand_heads_out(u, self.rows(f"HW.{fused}", group)[:, call.layer], b))
            else:
                for m in targeted:
                    call.add(m, group, lorta_expand_heads_out(u, self.rows(f"HW.{m}", group)[:, call.layer], b))
        else:
            c_lm = self.rows("C_lm", group)[:, call.layer]  # [C, 4, r]
            u = lorta_shrink_heads_in(x, self.rows("B_t", group), self.rows("C_h", group))
            for m in targeted:
                a_t = self.rows("A_t_kv" if m in ("k_proj", "v_proj") else "A_t", group)
                call.add(m, group, lorta_expand_heads_in(u, c_lm[:, MATRICES.index(m)], a_t))
