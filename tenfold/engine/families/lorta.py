"""LoRTA: one row holds the adapter's five factor matrices (KBs), shared by every layer.

Stored per row: the shrink factor (heads_out: A [d, r]; heads_in: B^T [d_h, r] with the head factors C_h), the
expand factor (heads_out: B [r, d_h] with C_h, and C_h group-averaged for grouped-query k/v; heads_in: A^T [r, d]
and its group-averaged k/v rows) and c_lm = C_l[layer] * C_m[matrix] * alpha / r [L, 4, r]. The shrink is computed
once per layer call and reused by q, k and v.
"""

from __future__ import annotations

import torch

from ...adapters.lorta.family import MATRICES
from ...kernels.lorta import (lorta_expand_heads_in, lorta_expand_heads_out, lorta_shrink_heads_in,
                              lorta_shrink_heads_out)
from .base import Bucket


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
            return {"A": a, "B": b, "C_h": c_h, "C_h_kv": c_h.reshape(-1, group, r).mean(1), "C_lm": c_lm}
        a_kv = a.reshape(-1, group, b.shape[1], r).mean(1).reshape(-1, r)
        return {"B_t": b.t(), "C_h": c_h, "A_t": a.t(), "A_t_kv": a_kv.t(), "C_lm": c_lm}

    def adapts(self, layer, module):
        return module in self.modules

    def apply(self, call, group):
        targeted = [m for m in call.modules if m in self.modules]
        if not targeted:
            return
        x = group.gather(call.x_compute)
        c_lm = self.rows("C_lm", group)[:, call.layer]  # [C, 4, r]
        if self.orientation == "heads_out":
            u = lorta_shrink_heads_out(x, self.rows("A", group))
            b = self.rows("B", group)
            weights = {m: self.rows("C_h_kv" if m in ("k_proj", "v_proj") else "C_h", group)
                       * c_lm[:, MATRICES.index(m), None, :] for m in targeted}
            if len(targeted) == len(call.modules):  # every sub-module: one expand over all their heads
                head_weights = torch.cat([weights[m] for m in call.modules], 1) if len(targeted) > 1 else weights[
                    targeted[0]]
                call.add_fused(group, lorta_expand_heads_out(u, head_weights, b))
            else:
                for m in targeted:
                    call.add(m, group, lorta_expand_heads_out(u, weights[m], b))
        else:
            u = lorta_shrink_heads_in(x, self.rows("B_t", group), self.rows("C_h", group))
            for m in targeted:
                a_t = self.rows("A_t_kv" if m in ("k_proj", "v_proj") else "A_t", group)
                call.add(m, group, lorta_expand_heads_in(u, c_lm[:, MATRICES.index(m)], a_t))
