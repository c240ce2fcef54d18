"""LoRETTA adp: per (layer, module) a bottleneck adapter with W_down [d, b], b_down, W_up [b, d], b_up and its
scaling; TT cores are contracted when the adapter takes a slot (absent biases are stored as zeros, exactly).

Placement: pre-adapters on gate_proj and up_proj inputs, y = W0 (x + a(x)). vLLM fuses gate and up into one
projection whose two halves would need two different inputs, so the base output (computed on x) is corrected per
half by W0_half a(x) for the adapter's tokens only. The post-adapter on down_proj reads the base output:
y = W0 x + a(W0 x).
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

    def __init__(self, signature, spec, dtype, device):
        super().__init__(signature, spec, dtype, device)
        _, self.bottleneck_size, non_linearity, _ = signature
        self._act = ACT2FN[non_linearity]

    @classmethod
    def signature_of(cls, adapter):
        return "loretta_adp", adapter.rank, adapter.config["non_linearity"], tuple(adapter.targets)

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

    def apply(self, call, group):
        targeted = self.targeted(call)
        pre = [m for m in targeted if PLACEMENT[m] == "pre"]
        x = group.gather(call.x_compute) if pre else None
        for m in targeted:
            name = key_name((call.layer, m))
            if PLACEMENT[m] == "pre":
                a = self._adapter_output(name, x, group)
                a = group.real_rows(a)
                call.add_rows(m, a @ call.weight_of(m).t())
            else:  # post: the module's whole output is the adapter's input
                y = group.gather(call.output[:, call.modules[m]].to(call.compute_dtype))
                call.add(m, group, self._adapter_output(name, y, group))
