"""LoRETTA adp: per (layer, module) a bottleneck adapter with W_down [d, b], b_down, W_up [b, d], b_up and its
scaling; TT cores are contracted when the adapter takes a slot (absent biases are stored as zeros, exactly).

Placement: pre-adapters on gate_proj and up_proj inputs, y = W0 (x + a(x)). vLLM fuses gate and up into one
projection whose two halves would need two different inputs: the base GEMM runs on x + a_gate(x) for the adapter's
tokens (the "carrier" half, exact), and the other half is corrected by W0_up (a_up(x) - a_gate(x)) for those tokens
only. That is one extra pass over half of the fused weight per token, where correcting both halves of a GEMM on x
would take the whole weight. The post-adapter on down_proj reads the layer's whole output, y = W0 x + a(W0 x):
under tensor parallelism it runs after vLLM's all-reduce, on every rank on the same replicated output.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN

from ...adapters.base import key_name
from ...adapters.loretta_adp.family import PLACEMENT
from ...kernels.bottleneck import bottleneck
from .base import PerModuleBucket


class BottleneckBucket(PerModuleBucket):
    family = "loretta_adp"
    reads_output = True

    def __init__(self, signature, spec, dtype, device, shard=None, cpu_kernels=False):
        super().__init__(signature, spec, dtype, device, shard, cpu_kernels)
        _, self.bottleneck_size, non_linearity, _ = signature
        self._act = ACT2FN[non_linearity]

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
            tensors.update({
                f"Wd.{name}": w_down, f"Wu.{name}": w_up,
                f"bd.{name}": b_down if b_down is not None else torch.zeros(w_down.shape[1]),
                f"bu.{name}": b_up if b_up is not None else torch.zeros(w_up.shape[1]),
                f"s.{name}": torch.as_tensor(scaling, dtype=torch.float32).reshape(()),
            })
        return tensors

    def _adapter_output(self, name, z, group):
        return bottleneck(z, self.rows(f"Wd.{name}", group), self.rows(f"bd.{name}", group),
                          self.rows(f"Wu.{name}", group), self.rows(f"bu.{name}", group),
                          self.rows(f"s.{name}", group), self._act)

    @classmethod
    def may_adapt_input(cls, module):
        return PLACEMENT.get(module) == "pre"

    def adapt_input(self, call, group, inputs):
        pre = [m for m in self.targeted(call) if PLACEMENT[m] == "pre"]
        if not pre:
            return inputs
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
                if m != carrier:
                    wrong = outputs[m] - outputs[carrier] if m in outputs else -outputs[carrier]
                    call.add_rows(m, wrong @ call.weight_of(m).t())

    def apply_reduced(self, call, group):
        for m in self.targeted(call):
            if PLACEMENT[m] == "post":  # the module's whole output is the adapter's input
                y = group.gather(call.x_compute[:, call.modules[m]])
                call.add(m, group, self._adapter_output(key_name((call.layer, m)), y, group))
