"""LoRETTA adp: per (layer, module) a bottleneck adapter with W_down [d, b], b_down, W_up [b, d], b_up and its
scaling; TT cores are contracted when the adapter takes a slot (absent biases are stored as zeros, exactly).

Placement: pre-adapters on gate_proj and up_proj inputs, y = W0 (x + a(x)). vLLM fuses gate and up into one
projection whose two halves would need two different inputs: the base GEMM runs on x + a_gate(x) for the adapter's
tokens (the "carrier" half, exact), and the other half is corrected by W0_up (a_up(x) - a_gate(x)) for those tokens
only. That is one extra pass over half of the fused weight per token, where correcting both halves of a GEMM on x
would take the whole weight. The post-adapter on down_proj reads the layer's whole output, y = W0 x + a(W0 x):
under tensor parallelism it runs after vLLM's all-reduce, on every rank on the same replicated output.

On CPU (`cpu_kernels`) the bottleneck runs in tenfold's kernels (`tenfold.kernels.cpu`), reading the tables in the
model's dtype in place. The tables fold the scaling into W_up and b_up, and keep s * b_up as an extra row of W_up
read by a column of ones in h, so a(x) is one fp32 sum. For the activations the kernels compute
(`cpu.BOTTLENECK_ACTIVATIONS`) one call per layer does everything: `bottleneck_apply` adds the post-adapter into the
output, `bottleneck_pre` writes x + a_carrier(x) into the GEMM input's copy and the difference a_m(x) - a_carrier(x)
that the correction reads. For other activations the shrink h = x W_down runs in the kernels, bias and activation in
torch on the small fp32 [n, b] h, then the kernels' expand. The correction is one GEMM of the difference with W0^T
[d, out_m] in the model's dtype on the transposed frozen copy (`SlotStore.frozen_transposed`): oneDNN's bf16 GEMM
runs it at twice the speed of the kernels' expand; when the group holds most of the step's tokens, over all of them
in place (the other tokens' differences are zeros), which spares gathering and scattering the output's rows.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ...adapters.base import key_name
from ...adapters.loretta_adp.family import PLACEMENT
from ...kernels import cpu
from ...kernels.bottleneck import bottleneck
from .base import PerModuleBucket


class BottleneckBucket(PerModuleBucket):
    family = "loretta_adp"
    reads_output = True
    has_cpu_kernels = True

    def __init__(self, signature, spec, dtype, device, shard=None, cpu_kernels=False):
        super().__init__(signature, spec, dtype, device, shard, cpu_kernels)
        _, self.bottleneck_size, non_linearity, _ = signature
        self._act = ACT2FN[non_linearity]
        # the name the fused kernels take, where they compute this activation
        self._kernel_act = non_linearity if non_linearity in cpu.BOTTLENECK_ACTIVATIONS else None

    @classmethod
    def signature_of(cls, adapter):
        return "loretta_adp", adapter.rank, adapter.config["non_linearity"], tuple(adapter.targets)

    def frozen_weights(self):
        # the correction reads W0 of the fused gate_up projection's non-carrier half (see `apply`)
        fused = [m for m in PLACEMENT if PLACEMENT[m] == "pre"]  # in the fused layer's order: gate, up
        needed = set()
        for layer in {layer for layer, _ in self._targets}:
            pre = [m for m in fused if (layer, m) in self._targets]
            needed |= {(layer, m) for m in fused if pre and m != pre[0]}
        return needed

    def row_tensors(self, adapter):
        tensors = {}
        for key in adapter.targets:
            w_down, b_down, w_up, b_up, scaling = adapter.bottleneck(key)
            name = key_name(key)
            b_down = b_down if b_down is not None else torch.zeros(w_down.shape[1])
            b_up = b_up if b_up is not None else torch.zeros(w_up.shape[1])
            if self.cpu_kernels:  # the kernels' layout (module docstring): W_down as [b, d] rows, s folded into W_up
                tensors.update({f"Wd_t.{name}": w_down.t(), f"bd.{name}": b_down,
                                f"Wu.{name}": torch.cat([w_up, b_up[None]]) * scaling})
                continue
            tensors.update({
                f"Wd.{name}": w_down, f"Wu.{name}": w_up,
                f"bd.{name}": b_down, f"bu.{name}": b_up,
                f"s.{name}": torch.as_tensor(scaling, dtype=torch.float32).reshape(()),
            })
        return tensors

    def _adapter_output(self, name, z, group):
        return bottleneck(z, self.rows(f"Wd.{name}", group), self.rows(f"bd.{name}", group),
                          self.rows(f"Wu.{name}", group), self.rows(f"bu.{name}", group),
                          self.rows(f"s.{name}", group), self._act)

    def _hidden(self, call, group, x, modules):
        """The kernels' shrink side: per module m, act(x W_down + b_down) [n, b + 1] in fp32 for the group's tokens
        (x [T, d] with contiguous rows), with a last column of ones that reads s * b_up from W_up's extra row."""
        n, b, tables = group.tokens.numel(), self.bottleneck_size, self.tables
        names = [key_name((call.layer, m)) for m in modules]
        hidden = torch.empty(len(modules), n, b + 1)
        cpu.lowrank_shrink(x, group.tokens, group.token_rows, [tables[f"Wd_t.{name}"] for name in names],
                           [h[:, :b] for h in hidden])
        hidden[:, :, b] = 1
        for h, name in zip(hidden, names):
            z = h[:, :b]
            z.copy_(self._act(z.add_(tables[f"bd.{name}"].index_select(0, group.token_rows))))
        return dict(zip(modules, hidden))

    def _kernel_tables(self, call, modules):
        """The fused kernels' tables of `modules` in this layer: W_down^T, b_down and W_up' lists."""
        names = [key_name((call.layer, m)) for m in modules]
        tables = self.tables
        return ([tables[f"Wd_t.{n}"] for n in names], [tables[f"bd.{n}"] for n in names],
                [tables[f"Wu.{n}"] for n in names])

    def _expand(self, call, group, h, module, out, tokens=None):
        """out[tokens] += h @ [s W_up; s b_up] of module's adapters, in place (out: [T, d] with contiguous rows)."""
        cpu.lowrank_expand(h, group.tokens if tokens is None else tokens, group.token_rows,
                           [self.tables[f"Wu.{key_name((call.layer, module))}"]], [out])

    @classmethod
    def may_adapt_input(cls, module):
        return PLACEMENT.get(module) == "pre"

    def adapt_input(self, call, group, inputs):
        pre = [m for m in self.targeted(call) if PLACEMENT[m] == "pre"]
        if not pre:
            return inputs
        if self.cpu_kernels and self._kernel_act is not None:
            if inputs is call.x:  # the layer's own input stays as vLLM passed it
                inputs = inputs.clone()
            # difference [T, d] in the model's dtype (that of the frozen copies beside the kernels), zero outside
            # the group: the correction in `apply` reads it
            difference = torch.zeros_like(call.x)
            cpu.bottleneck_pre(call.x_rows, group.tokens, group.token_rows, *self._kernel_tables(call, pre),
                               self._kernel_act, inputs, difference)
            call.scratch[self] = pre[0], difference
            return inputs
        if self.cpu_kernels:
            # a_carrier(x) in fp32, one row per token in the group's order: the correction in `apply` reuses it
            hidden = self._hidden(call, group, call.x_rows, pre)
            adapted = torch.zeros(group.tokens.numel(), call.x.shape[1])
            self._expand(call, group, hidden[pre[0]], pre[0], adapted, torch.arange(group.tokens.numel()))
            call.scratch[self] = pre[0], (hidden, adapted)
            if inputs is call.x:  # the layer's own input stays as vLLM passed it
                inputs = inputs.clone()
            rows = inputs.index_select(0, group.tokens).float().add_(adapted)  # x + a(x), rounded once
            return inputs.index_copy_(0, group.tokens, rows.to(inputs.dtype))
        x = group.gather(call.x_compute)
        outputs = {m: group.real_rows(self._adapter_output(key_name((call.layer, m)), x, group)) for m in pre}
        carrier = pre[0]
        call.scratch[self] = carrier, outputs
        if inputs is call.x:  # the layer's own input stays as vLLM passed it
            inputs = inputs.clone()
        inputs.index_add_(0, group.tokens, outputs[carrier].to(inputs.dtype))
        return inputs

    def apply(self, call, group):
        carrier, outputs = call.scratch.pop(self, (None, {}))
        if carrier is not None:
            # every other sub-module of the fused GEMM saw x + a_carrier(x) instead of x + a_m(x) (a_m = 0 where
            # the adapter does not target m)
            for m in call.modules:
                if m != carrier and isinstance(outputs, torch.Tensor):  # the fused kernels' difference
                    self._correct_difference(call, group, outputs, m)
                elif m != carrier and self.cpu_kernels:  # outputs: the kernels' h of each module and a_carrier(x)
                    self._correct(call, group, carrier, *outputs, m)
                elif m != carrier:
                    wrong = outputs[m] - outputs[carrier] if m in outputs else -outputs[carrier]
                    w0 = call.weight_of(m)  # in the frozen copies' dtype (bf16 beside the CPU kernels)
                    call.add_rows(m, (wrong.to(w0.dtype) @ w0.t()).to(wrong.dtype))

    def _correct_difference(self, call, group, difference, module):
        """out[:, module] += (a_m(x) - a_carrier(x)) W0^T from `bottleneck_pre`'s difference [T, d]."""
        w0_t = call.weight_of(module).t()  # W0^T [d, out_m]
        difference = difference.to(w0_t.dtype)
        columns = call.output[:, call.modules[module]]
        if 2 * group.tokens.numel() >= columns.shape[0]:  # one GEMM over every row, in place
            columns.addmm_(difference, w0_t)
            return
        rows = columns.index_select(0, group.tokens)
        rows = torch.addmm(rows.to(w0_t.dtype), difference.index_select(0, group.tokens), w0_t)
        columns.index_copy_(0, group.tokens, rows.to(columns.dtype))

    def _correct(self, call, group, carrier, hidden, adapted, module):
        """The kernels' correction of module's half of the fused GEMM: out[:, module] += (a_m(x) - a_carrier(x)) W0^T,
        the difference summed in fp32 from `adapted` = a_carrier(x) (a_m = 0 for a module the adapter leaves alone)."""
        wrong = adapted.neg()
        if module in hidden:
            self._expand(call, group, hidden[module], module, wrong, torch.arange(group.tokens.numel()))
        # one GEMM on the transposed frozen copy (SlotStore.frozen_transposed) in its dtype, which runs at twice the
        # speed of the kernels' expand with W0^T as a table; added to the tokens' rows gathered from the output's
        # columns and copied back (an index_add into a column slice takes a slow scatter path)
        w0_t = call.weight_of(module).t()  # W0^T [d, out_m]
        columns = call.output[:, call.modules[module]]
        rows = columns.index_select(0, group.tokens)
        rows = torch.addmm(rows.to(w0_t.dtype), wrong.to(w0_t.dtype), w0_t)
        columns.index_copy_(0, group.tokens, rows.to(columns.dtype))

    def apply_reduced(self, call, group):
        for m in self.targeted(call):
            if PLACEMENT[m] == "post" and self.cpu_kernels and self._kernel_act is not None:
                columns = call.modules[m]  # x may be call.output itself: each token's x is read before its update
                cpu.bottleneck_apply(call.x_rows[:, columns], group.tokens, group.token_rows,
                                     *self._kernel_tables(call, [m]), self._kernel_act, [call.output[:, columns]])
            elif PLACEMENT[m] == "post" and self.cpu_kernels:
                # the shrink reads every token's input before the expand writes: call.x may be call.output itself
                columns = call.modules[m]
                h = self._hidden(call, group, call.x_rows[:, columns], [m])[m]
                self._expand(call, group, h, m, call.output[:, columns])
            elif PLACEMENT[m] == "post":  # the module's whole output is the adapter's input
                y = group.gather(call.x_compute[:, call.modules[m]])
                call.add(m, group, self._adapter_output(key_name((call.layer, m)), y, group))
