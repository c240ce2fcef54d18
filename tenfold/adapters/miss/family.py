"""Bone / MiSS (PEFT's MissConfig, default and mini variants): block-affine updates with one shared matrix.

The input is cut into blocks of width r (zero-padded when r does not divide it, as PEFT does) and summed:
u = sum_j x_j [r]. default: dy = u @ D with D [r, out]. mini: D is M [r, mini_r] tiled along the output
(D[:, o] = M[:, o % mini_r]). Exact LoRA form: A[j, i] = 1 iff i % r == j, B = D^T.
Tensor names: layers.<i>.<module>.miss_block ([r, out] or, for mini, [r, mini_r]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import Adapter, LowRankAdapter, key_name, parse_key_name
from ..errors import AdapterMismatchError, where
from ..settings import check_targeting
from ..values import REQUIRED

VARIANTS = ("default", "mini")


def block_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """sum over the width-r blocks of the last axis (zero-padding the last block): [..., in] -> [..., r]."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(-2)


def block_sum_matrix(r: int, fan_in: int, dtype, device=None) -> torch.Tensor:
    """The LoRA A of a block sum: A[j, i] = 1 iff i % r == j."""
    return (torch.arange(fan_in, device=device)[None, :] % r == torch.arange(r, device=device)[:, None]).to(dtype)


class PerModuleBlocks(Adapter):
    """Shared plumbing of MiSS and Bat: one `miss_block` tensor per module."""

    def __init__(self, config: dict, tensors: dict, spec=None, source=None):
        super().__init__(config, spec, source)
        keys = []
        for name, value in tensors.items():
            if not name.endswith(".miss_block"):
                raise AdapterMismatchError(f"{where(source, name)}: expected only layers.<i>.<module>.miss_block tensors")
            keys.append(parse_key_name(name.removesuffix(".miss_block")))
            self.set_tensor(name, value)
        self._targets = sorted(keys)

    @classmethod
    def check_config(cls, values):
        ranks = {"r": values.int("r")}
        values.names("target_modules")
        check_targeting(values)
        return ranks

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    def block(self, key) -> torch.Tensor:
        return self.tensor(f"{key_name(key)}.miss_block")


class MiSS(PerModuleBlocks, LowRankAdapter):
    family = "miss"

    def __init__(self, config, tensors, spec=None, source=None):
        super().__init__(config, tensors, spec, source)
        if config.get("variant") not in VARIANTS:
            raise AdapterMismatchError(f"{where(source)}: MiSS variant must be one of {VARIANTS}, found "
                                       f"{config.get('variant')!r}")
        if config["variant"] == "mini" and not config.get("mini_r"):
            raise AdapterMismatchError(f"{where(source)}: the mini variant needs mini_r in the config")

    @classmethod
    def check_config(cls, values):
        variant = values.choice("variant", VARIANTS)
        values.int("mini_r", REQUIRED if variant == "mini" else None)
        return super().check_config(values)

    def densified_entries(self):
        spec = self.require_spec("the LoRA form")
        entries = sum(self.rank * sum(spec.module_shape(m)) for _, m in self.targets)
        return entries, f"its LoRA form (rank {self.rank}, the blocks tiled, for {len(self.targets)} modules)"

    @classmethod
    def create(cls, spec, target_modules, r=16, variant="default", mini_r=None, init="random", seed=0,
               dtype=torch.float32, scale=0.1):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(spec.num_layers):
            for m in target_modules:
                fan_in, fan_out = spec.module_shape(m)
                cols = fan_out if variant == "default" else mini_r
                block = torch.randn(r, cols, generator=g, dtype=dtype) * (scale / math.sqrt(fan_in))
                tensors[f"layers.{layer}.{m}.miss_block"] = block if init == "random" else torch.zeros_like(block)
        config = {"r": r, "variant": variant, "target_modules": sorted(target_modules),
                  **({"mini_r": mini_r} if variant == "mini" else {})}
        return cls(config, tensors, spec)

    def expand_matrix(self, key, fan_out: int | None = None) -> torch.Tensor:
        """D [r, out]: the block itself, or the mini block tiled along the output."""
        block = self.block(key)
        if self.config["variant"] == "default":
            return block
        fan_out = fan_out or self.require_spec("tiling a mini block").module_shape(key[1])[1]
        return block.repeat(1, fan_out // block.shape[1])

    def lora_factors(self, key):
        fan_in, fan_out = self.require_spec("the LoRA form").module_shape(key[1])
        d = self.expand_matrix(key, fan_out)
        return block_sum_matrix(self.rank, fan_in, d.dtype, d.device), d.t()

    def forward(self, key, x, base):
        y = base(x)
        d = self.expand_matrix(key, y.shape[-1])
        return y + (block_sum(x.to(d.dtype), self.rank) @ d).to(y.dtype)

    def _validate(self, spec):
        r = self.rank
        for key in self.targets:
            fan_in, fan_out = spec.module_shape(key[1])
            name = f"{key_name(key)}.miss_block"
            if r > fan_in:
                raise AdapterMismatchError(f"{where(self.source, name)}: r={r} exceeds the module's input width {fan_in}")
            if self.config["variant"] == "default":
                self.expect_shape(name, (r, fan_out))
            else:
                mini_r = self.config["mini_r"]
                if fan_out % mini_r:
                    raise AdapterMismatchError(f"{where(self.source, name)}: mini_r={mini_r} does not divide the output "
                                               f"width {fan_out} of {key[1]}")
                self.expect_shape(name, (r, mini_r))

    def describe(self):
        return {"variant": self.config["variant"], **({"mini_r": self.config["mini_r"]}
                                                      if self.config["variant"] == "mini" else {})}
