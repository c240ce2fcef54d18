"""LoRA: per module A [r, in], B [out, r]; delta = scaling * B @ A with scaling alpha/r (alpha/sqrt(r) with rsLoRA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import LowRankAdapter, ModuleKey, key_name, parse_key_name
from ..errors import AdapterMismatchError, where
from ..settings import check_targeting
from ..values import finite_number


class LoRA(LowRankAdapter):
    family = "lora"

    def __init__(self, config: dict, tensors: dict, spec=None, source=None):
        super().__init__(config, spec, source)
        for name, value in tensors.items():
            self.set_tensor(name, value)
        self._targets = sorted({parse_key_name(n.rsplit(".", 1)[0]) for n in tensors})
        for key in self._targets:
            for part in ("lora_A", "lora_B"):
                if not self.has_tensor(f"{key_name(key)}.{part}"):
                    raise AdapterMismatchError(f"{where(source, key_name(key) + '.' + part)}: missing; LoRA needs both "
                                               f"lora_A and lora_B for every module")

    @classmethod
    def create(cls, spec, target_modules, r=16, lora_alpha=16.0, init="random", seed=0, dtype=torch.float32, scale=0.1):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(spec.num_layers):
            for m in target_modules:
                fan_in, fan_out = spec.module_shape(m)
                tensors[f"layers.{layer}.{m}.lora_A"] = torch.randn(r, fan_in, generator=g, dtype=dtype) / math.sqrt(fan_in)
                b = torch.randn(fan_out, r, generator=g, dtype=dtype) * (scale / math.sqrt(r))
                tensors[f"layers.{layer}.{m}.lora_B"] = b if init == "random" else torch.zeros_like(b)
        config = {"r": r, "lora_alpha": float(lora_alpha), "use_rslora": False, "module_alphas": {},
                  "target_modules": sorted(target_modules)}
        return cls(config, tensors, spec)

    @classmethod
    def check_config(cls, values):
        ranks = {"r": values.int("r")}
        values.number("lora_alpha")
        values.flag("use_rslora")
        alphas = values.config.get("module_alphas")
        if alphas is not None and (not isinstance(alphas, dict) or any(
                not isinstance(k, str) or finite_number(a) for k, a in alphas.items())):
            values.fail("module_alphas", "a mapping of module names (layers.<i>.<module>) to finite numbers")
        values.names("target_modules")
        values.layer_list("layers")
        check_targeting(values)
        return ranks

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def largest_lora_rank(self) -> int:
        return max(self.factors(k)[0].shape[0] for k in self.targets)  # rank_pattern may vary it per module

    def factors(self, key: ModuleKey):
        name = key_name(key)
        return self.tensor(f"{name}.lora_A"), self.tensor(f"{name}.lora_B")

    def scaling(self, key: ModuleKey) -> float:
        r = self.factors(key)[0].shape[0]
        alpha = (self.config.get("module_alphas") or {}).get(key_name(key), self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def lora_factors(self, key):
        a, b = self.factors(key)
        return a, b * self.scaling(key)

    def forward(self, key, x, base):
        a, b = self.factors(key)
        return base(x) + F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype) * self.scaling(key)

    def _validate(self, spec):
        for key in self.targets:
            fan_in, fan_out = spec.module_shape(key[1])
            a, b = self.factors(key)
            r = a.shape[0]
            if a.dim() != 2 or r < 1:
                raise AdapterMismatchError(f"{where(self.source, key_name(key) + '.lora_A')}: expected shape [r, "
                                           f"{fan_in}] with r >= 1, found {list(a.shape)}")
            self.expect_shape(f"{key_name(key)}.lora_A", (r, fan_in))
            self.expect_shape(f"{key_name(key)}.lora_B", (fan_out, r))

    def dense_equivalent_params(self) -> int:
        return self.num_params()

    def describe(self):
        ranks = sorted({self.factors(k)[0].shape[0] for k in self.targets})
        return {"lora_alpha": self.config["lora_alpha"], "use_rslora": bool(self.config.get("use_rslora")),
                **({"ranks": ranks} if len(ranks) > 1 else {})}
