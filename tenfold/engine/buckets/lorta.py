"""LoRTA: one row holds the adapter's factors, shared by every layer, with its head weights precomputed per layer.

Stored per row: the shrink factor (heads_out: A^T [r, d]; heads_in: B^T [d_h, r] with the head factors C_h, or
beside tenfold's CPU kernels their product A_in [r, d], one matrix for the register-blocked shrink), the
expand factor (heads_out: B [r, d_h]; heads_in: A^T [r, d] and its group-averaged k/v rows) and the scalings
c_lm = C_l[layer] * C_m[matrix] * alpha / r. heads_out stores them already multiplied into the head factors, per
layer and matrix ([L, heads, r], C_h group-averaged for grouped-query k/v, and q|k|v side by side for the fused
projection), which saves several small ops per layer call. Measured on Llama-2-7B shapes at r=64
(tests/test_family_math.py): the adapter holds 275k parameters; a heads_out row 729k (2.65x: A^T 262k, the head
weights 262k and their fused q|k|v copy 197k; 2.9 MB in fp32), a heads_in row 543k (1.97x: A^T and its k/v copy
524k; beside the CPU kernels 795k, 2.89x, with A_in). The per-layer dense LoRA form of the same update is 67.1M parameters, 92x a heads_out row. The shrink is
computed once per layer call and reused by q, k and v.

Tensor parallel: q, k and v keep the head factors (heads_out) or A^T columns (heads_in) of this rank's own output
heads; o_proj reads this rank's attention heads, so it keeps A's rows of them (heads_out) or their C_h (heads_in)
as extra `.o_proj` tables, and its partial update joins the layer's all-reduce.
"""

from __future__ import annotations

import torch

from ...adapters.lorta.family import MATRICES
from ...kernels import cpu
from ...kernels.lorta import (lorta_heads_in_expand, lorta_heads_in_shrink, lorta_heads_out_expand,
                              lorta_heads_out_shrink)
from .base import Bucket

QKV = "q_proj+k_proj+v_proj"  # the fused projection's sub-modules, as `LayerCall.modules` lists them


class LoRTABucket(Bucket):
    family = "lorta"
    keep_gathered_rows = True  # every table is shared by all layers (a row is 0.5-0.7M entries on 7B shapes at r=64)
    has_cpu_kernels = True  # both orientations: one kernel call per layer call

    def __init__(self, signature, spec, dtype, device, shard=None, cpu_kernels=False):
        super().__init__(signature, spec, dtype, device, shard, cpu_kernels)
        _, self.orientation, self.rank, modules = signature
        self.modules = frozenset(modules)
        self.zero_row = not cpu_kernels  # read by the tokens outside a group in the torch ops' `_expand_in_place`

    @classmethod
    def signature_of(cls, adapter):
        return "lorta", adapter.config["orientation"], adapter.rank, tuple(sorted(adapter.config["target_modules"]))

    def row_tensors(self, adapter):
        a, b = adapter.tensor("lora_A"), adapter.tensor("lora_B")
        c_l, c_h, c_m = adapter.tensor("lora_C_l"), adapter.tensor("lora_C_h"), adapter.tensor("lora_C_m")
        group, r = self.spec.group_size, self.rank
        c_lm = c_l[:, None, :] * c_m[None] * adapter.scale  # [L, 4, r]
        shard, o_local = self.shard, self.shard.sharded and "o_proj" in self.modules
        if self.orientation == "heads_out":
            heads = {m: c_h.reshape(-1, group, r).mean(1) if m in ("k_proj", "v_proj") else c_h for m in self.modules}
            weights = {m: (c_lm[:, MATRICES.index(m), None, :] * heads[m][None])[:, shard.heads_out(m)]
                       for m in self.modules}  # [L, this rank's output heads, r]
            # A kept as [r, d] and read through a transposed view (a faster batched matmul than on [d, r])
            tables = {"A_t": a.t(), "B": b, **{f"HW.{m}": w for m, w in weights.items()}}
            if {"q_proj", "k_proj", "v_proj"} <= self.modules:
                tables[f"HW.{QKV}"] = torch.cat([weights[m] for m in ("q_proj", "k_proj", "v_proj")], 1)
            if o_local:
                tables["A_t.o_proj"] = a[shard.in_range("o_proj")].t()
            return tables
        a_kv = a.reshape(-1, group, b.shape[1], r).mean(1).reshape(-1, r)
        tables = {"A_t": a.t()[:, shard.out_range("q_proj")], "A_t_kv": a_kv.t()[:, shard.out_range("k_proj")],
                  "C_lm": c_lm}
        if self.cpu_kernels:  # the shrink as one [r, in] matrix: C_h[h, k] * B^T[c, k] at column h * d_h + c
            def a_in(heads):
                return (heads.float()[:, None, :] * b.t().float()[None]).reshape(-1, r).t()

            tables["A_in"] = a_in(c_h)
            if o_local:
                tables.update({"A_t.o_proj": a.t(), "A_in.o_proj": a_in(c_h[shard.heads_in("o_proj")])})
            return tables
        tables.update({"B_t": b.t(), "C_h": c_h})
        if o_local:
            tables.update({"A_t.o_proj": a.t(), "C_h.o_proj": c_h[shard.heads_in("o_proj")]})
        return tables

    def adapts(self, layer, module):
        return module in self.modules

    def apply(self, call, group):
        targeted = [m for m in call.modules if m in self.modules]
        if not targeted:
            return
        layer = call.layer
        if self.cpu_kernels and self.orientation == "heads_out":  # one call, straight into the output's heads
            fused = f"HW.{'+'.join(call.modules)}"
            if len(targeted) == len(call.modules) and fused in self.tables:
                weights, outputs = [self.tables[fused][:, layer]], [call.output]
            else:
                weights = [self.tables[f"HW.{m}"][:, layer] for m in targeted]
                outputs = [call.output[:, call.modules[m]] for m in targeted]
            cpu.lorta_apply(call.x_rows, group.tokens, group.token_rows, self.tables[self._own("A_t", call)],
                            self.tables["B"], weights, outputs)
            return
        if self.cpu_kernels:  # heads_in: one call, the shrink over the input heads, each module's expand
            c_lm = self.tables["C_lm"][:, layer]  # [R, 4, r]
            cpu.lorta_in_apply(call.x_rows, group.tokens, group.token_rows, self.tables[self._own("A_in", call)],
                               [c_lm[:, MATRICES.index(m)] for m in targeted],
                               [self.tables["A_t_kv" if m in ("k_proj", "v_proj") else self._own("A_t", call)]
                                for m in targeted], [call.output[:, call.modules[m]] for m in targeted])
            return
        x = group.gather(call.x_compute)
        if self.orientation == "heads_out":
            u = lorta_heads_out_shrink(x, self.rows(self._own("A_t", call), group).transpose(1, 2))
            fused = f"HW.{'+'.join(call.modules)}"
            if len(targeted) == len(call.modules) and fused in self.tables:  # one expand over all heads of the call
                if group.dense and call.output.dtype == call.compute_dtype and call.output.is_contiguous():
                    self._expand_in_place(call, group, u, fused)
                else:
                    call.add_fused(group, lorta_heads_out_expand(u, self.rows(fused, group, layer),
                                                                 self.rows("B", group)))
            else:
                for m in targeted:
                    call.add(m, group, lorta_heads_out_expand(u, self.rows(f"HW.{m}", group, layer),
                                                              self.rows("B", group)))
        else:
            c_lm = self.rows("C_lm", group, layer)  # [C, 4, r]
            u = lorta_heads_in_shrink(x, self.rows("B_t", group), self.rows(self._own("C_h", call), group))
            for m in targeted:
                a_t = self.rows("A_t_kv" if m in ("k_proj", "v_proj") else self._own("A_t", call), group)
                call.add(m, group, lorta_heads_in_expand(u, c_lm[:, MATRICES.index(m)], a_t))

    def _own(self, name, call):
        """The table of a single-module call's own shard when it has one (o_proj under tensor parallelism)."""
        if len(call.modules) == 1:
            (module,) = call.modules
            if f"{name}.{module}" in self.tables:
                return f"{name}.{module}"
        return name

    def _expand_in_place(self, call, group, u, head_weights):
        """The expand of a group holding most of the step's tokens, added into the output in place by one batched
        matmul over all T tokens in token order: no scatter of a delta. Tokens outside the group get u = 0 and read
        the bucket's zero row (`zero_row`), so their rows gain exact zeros whatever the adapters' rows hold. The
        per-token head weights and B are gathered once per step (KBs per token)."""
        key = ("in place", head_weights, call.layer)
        found = group.views.get(key)
        if found is None:
            rows = group.step_rows(self.capacity)
            b = group.views.get("B per token")
            if b is None:
                b = group.views["B per token"] = self.tables["B"].index_select(0, rows)
            found = group.views[key] = self.tables[head_weights][:, call.layer].index_select(0, rows), b
        weights, b = found                                           # [T, n_heads, r], [T, r, d_h]
        scaled = group.in_token_order(u)[:, None, :] * weights       # [T, n_heads, r]
        tokens, heads, head_dim = call.output.shape[0], weights.shape[1], b.shape[2]
        call.output.view(tokens, heads, head_dim).baddbmm_(scaled, b)
