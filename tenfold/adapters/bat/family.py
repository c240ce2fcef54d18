"""Bat (MiSS with init_weights="bat"): a block update that depends on the frozen weight — full rank, no LoRA form.

W0 is cut into r x r blocks W_ij (i: output block, j: input block). With one D_i [r, r] per output block
(miss_block [out/r, r, r]) the update is delta_ij = (W_ij + I) D_i, so per token
dy_i = sum_j W_ij (D_i x_j) + D_i sum_j x_j: a second pass over W0 on inputs transformed per output block.
Needs r | in and r | out. Tensor names: layers.<i>.<module>.miss_block.
"""

from __future__ import annotations

import math

import torch

from ..base import key_name
from ..errors import AdapterMismatchError, NoExactLoRAError, where
from ..miss.family import PerModuleBlocks


class Bat(PerModuleBlocks):
    family = "bat"
    has_exact_lora = False

    @classmethod
    def create(cls, spec, target_modules, r=16, init="random", seed=0, dtype=torch.float32, scale=0.1):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(spec.num_layers):
            for m in target_modules:
                fan_in, fan_out = spec.module_shape(m)
                block = torch.randn(fan_out // r, r, r, generator=g, dtype=dtype) * (scale / math.sqrt(fan_in))
                tensors[f"layers.{layer}.{m}.miss_block"] = block if init == "random" else torch.zeros_like(block)
        return cls({"r": r, "target_modules": sorted(target_modules)}, tensors, spec)

    def delta(self, key, base_weight=None):
        if base_weight is None:
            raise ValueError("a Bat delta depends on the frozen weight: pass base_weight")
        d = self.block(key)
        r = self.rank
        out_blocks, in_blocks = base_weight.shape[0] // r, base_weight.shape[1] // r
        w = base_weight.to(d.dtype).reshape(out_blocks, r, in_blocks, r).permute(0, 2, 1, 3)  # [i, j, r_out, r_in]
        eye = torch.eye(r, dtype=d.dtype, device=d.device)
        delta = (w + eye) @ d[:, None]  # (W_ij + I) D_i
        return delta.permute(0, 2, 1, 3).reshape(base_weight.shape)

    def forward(self, key, x, base):
        d = self.block(key)
        r = self.rank
        w0 = base.weight.to(d.dtype)
        out_blocks, in_blocks = w0.shape[0] // r, w0.shape[1] // r
        xb = x.to(d.dtype).reshape(*x.shape[:-1], in_blocks, r)                # x_j
        z = torch.einsum("iab,...jb->...ija", d, xb)                           # D_i x_j
        w = w0.reshape(out_blocks, r, in_blocks, r)                            # W_ij as [i, a, j, b]
        dy = torch.einsum("iajb,...ijb->...ia", w, z) + z.sum(-2)              # sum_j (W_ij + I) D_i x_j
        return base(x) + dy.reshape(*x.shape[:-1], -1).to(x.dtype)

    def lora_factors(self, key):
        raise NoExactLoRAError("bat has no exact LoRA form: its update (W0_ij + I) D_i depends on the frozen weight "
                               "and is full rank. tenfold serves it on the native path; PEFT's SVD conversion is lossy "
                               "and tenfold refuses it")

    def _validate(self, spec):
        r = self.rank
        for key in self.targets:
            fan_in, fan_out = spec.module_shape(key[1])
            if fan_in % r or fan_out % r:
                raise AdapterMismatchError(
                    f"{where(self.source, key_name(key) + '.miss_block')}: Bat needs r to divide both widths of "
                    f"{key[1]}: r={r}, in={fan_in}, out={fan_out}")
            self.expect_shape(f"{key_name(key)}.miss_block", (fan_out // r, r, r))
