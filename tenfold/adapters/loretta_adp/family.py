"""LoRETTA adp: tensorized bottleneck adapters around the MLP projections (nonlinear: no exact LoRA form).

adp(z) = act(z @ W_down + b_down) @ W_up + b_up, with W_down [d, b] and W_up [b, d] tensor trains and s the scaling
(a number, or one learned scalar per module stored as layers.<i>.<module>.adapter_scaling).
Placement (LoRETTA's Llama mapping):
- pre-adapter on gate_proj and up_proj inputs: y = W0 (x + s * adp(x)); gate and up have different adapters, so a
  fused gate_up projection sees two different inputs;
- post-adapter on the down_proj output: y = W0 x + s * adp(W0 x).
Tensor names: layers.<i>.<module>.adapter_down.cores.<k>, .adapter_down.bias [b], .adapter_up.cores.<k>,
.adapter_up.bias [d].
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ..base import Adapter, key_name
from ..errors import AdapterMismatchError, NoExactLoRAError, where
from ..loretta_rep.family import collect_cores, densified_cores
from ..settings import check_targeting
from ..tt import check_cores, mode_product, random_cores, tt_matrix
from ..values import Values

PLACEMENT = {"gate_proj": "pre", "up_proj": "pre", "down_proj": "post"}


def check_activation(values: Values) -> str:
    """non_linearity: the name of a transformers activation (LoRETTA's default: tanh)."""
    name = values.text("non_linearity", "tanh")
    if name not in ACT2FN:
        values.fail("non_linearity", "a transformers activation such as relu, tanh, gelu, silu")
    return name


def check_scaling(values: Values):
    """scaling: a number (1 when absent), or "learned" (one scalar per module in the checkpoint)."""
    if "scaling" in values.config and values.config["scaling"] is None:
        values.fail("scaling", "a number or 'learned'")
    if values.config.get("scaling") == "learned":
        return "learned"
    return values.number("scaling", 1.0)
_NAME = re.compile(r"^layers\.\d+\.\w+\.(adapter_down\.cores\.\d+|adapter_up\.cores\.\d+|adapter_down\.bias|"
                   r"adapter_up\.bias|adapter_scaling)$")


class LoRETTAAdp(Adapter):
    family = "loretta_adp"
    has_exact_lora = False

    def __init__(self, config: dict, tensors: dict, spec=None, source=None):
        super().__init__(config, spec, source)
        stray = [n for n in tensors if not _NAME.match(n)]
        if stray:
            raise AdapterMismatchError(f"{where(source, stray[0])}: not a LoRETTA adp tensor name")
        if config.get("non_linearity") not in ACT2FN:
            raise AdapterMismatchError(f"{where(source)}: unknown non_linearity {config.get('non_linearity')!r}; "
                                       f"expected a transformers activation such as relu, tanh, gelu, silu")
        for name, value in tensors.items():
            self.set_tensor(name, value)
        self._cores = collect_cores(tensors, ("adapter_down", "adapter_up"), source)
        b = self.rank
        for key, parts in self._cores.items():
            if key[1] not in PLACEMENT:
                raise AdapterMismatchError(f"{where(source, key_name(key))}: LoRETTA adp adapters sit on "
                                           f"{sorted(PLACEMENT)} only")
            for part in ("adapter_down", "adapter_up"):
                if part not in parts:
                    raise AdapterMismatchError(f"{where(source, key_name(key) + '.' + part)}: missing TT cores")
                numel = mode_product(parts[part], source, f"{key_name(key)}.{part}.cores")
                if numel % b:
                    raise AdapterMismatchError(f"{where(source, key_name(key) + '.' + part)}: mode sizes multiply to "
                                               f"{numel}, not a multiple of bottleneck_size={b}")
                check_cores(parts[part], numel, source, f"{key_name(key)}.{part}.cores", config["tensor_rank"])
            for part, size in (("adapter_down.bias", b), ("adapter_up.bias", numel // b)):
                name = f"{key_name(key)}.{part}"
                if self.has_tensor(name) and tuple(self.tensor(name).shape) != (size,):
                    raise AdapterMismatchError(f"{where(source, name)}: expected shape [{size}], found "
                                               f"{list(self.tensor(name).shape)}")
        if config.get("scaling") == "learned":
            for key in self._cores:
                if not self.has_tensor(f"{key_name(key)}.adapter_scaling"):
                    raise AdapterMismatchError(f"{where(source, key_name(key) + '.adapter_scaling')}: missing; the "
                                               f"config says scaling is learned")
        self._targets = sorted(self._cores)
        self._act = ACT2FN[config["non_linearity"]]

    @classmethod
    def create(cls, spec, target_modules=("gate_proj", "up_proj", "down_proj"), bottleneck_size=64, tensor_rank=5,
               non_linearity="relu", scaling=1.0, init="random", seed=0, dtype=torch.float32,
               scale=0.1):
        g = torch.Generator().manual_seed(seed)
        d, b = spec.hidden_size, bottleneck_size
        tensors = {}
        for layer in range(spec.num_layers):
            for m in target_modules:
                name = f"layers.{layer}.{m}"
                cores = {"adapter_down": random_cores(d * b, tensor_rank, 1 / math.sqrt(d), g),
                         "adapter_up": random_cores(b * d, tensor_rank, scale / math.sqrt(b), g, zero_last=init != "random")}
                for part, part_cores in cores.items():
                    for k, core in enumerate(part_cores):
                        tensors[f"{name}.{part}.cores.{k}"] = core.to(dtype)
                tensors[f"{name}.adapter_down.bias"] = (torch.randn(b, generator=g) * 0.1).to(dtype)
                up_bias = (torch.randn(d, generator=g) * scale * 0.1).to(dtype)
                tensors[f"{name}.adapter_up.bias"] = up_bias if init == "random" else torch.zeros_like(up_bias)
        config = {"bottleneck_size": b, "tensor_rank": tensor_rank, "non_linearity": non_linearity,
                  "scaling": scaling, "target_modules": sorted(target_modules)}
        return cls(config, tensors, spec)

    @classmethod
    def check_config(cls, values):
        ranks = {"bottleneck_size": values.int("bottleneck_size"), "tensor_rank": values.int("tensor_rank")}
        check_activation(values)
        check_scaling(values)
        values.names("target_modules")
        check_targeting(values)
        return ranks

    def densified_entries(self):
        return densified_cores(self._cores), f"contracting its TT cores (the bottleneck of size {self.rank} of each module)"

    @property
    def rank(self) -> int:
        return int(self.config["bottleneck_size"])

    def bottleneck(self, key):
        """(W_down [d, b], b_down [b] or None, W_up [b, d], b_up [d] or None, scaling)."""
        name, b = key_name(key), self.rank
        mats = []
        for part in ("adapter_down", "adapter_up"):
            cores = [self.tensor(f"{name}.{part}.cores.{k}") for k in range(len(self._cores[key][part]))]
            numel = math.prod(c.shape[1] for c in cores)
            shape = (numel // b, b) if part == "adapter_down" else (b, numel // b)
            bias = self.tensor(f"{name}.{part}.bias") if self.has_tensor(f"{name}.{part}.bias") else None
            mats += [tt_matrix(cores, *shape), bias]
        scaling = self.tensor(f"{name}.adapter_scaling") if self.config.get("scaling") == "learned" else self.config["scaling"]
        return (*mats, scaling)

    def adapter_output(self, key, z):
        """s * adp(z), computed in the adapter's dtype."""
        w_down, b_down, w_up, b_up, scaling = self.bottleneck(key)
        h = self._act(F.linear(z.to(w_down.dtype), w_down.t(), b_down))
        return (F.linear(h, w_up.t(), b_up) * scaling).to(z.dtype)

    def forward(self, key, x, base):
        if PLACEMENT[key[1]] == "pre":
            return base(x + self.adapter_output(key, x))
        y = base(x)
        return y + self.adapter_output(key, y)

    def delta(self, key, base_weight=None):
        raise NoExactLoRAError(f"loretta_adp is a nonlinear bottleneck adapter: it has no weight delta "
                               f"({key_name(key)}); use forward() or serve it on tenfold's native path")

    def lora_factors(self, key):
        raise NoExactLoRAError("loretta_adp has no exact LoRA form: its bottleneck adapters are nonlinear (bias and "
                               "activation between down and up projections). tenfold serves it on the native path; "
                               "conversion to LoRA is refused")

    def _validate(self, spec):
        d = spec.hidden_size
        for key in self.targets:
            for part in ("adapter_down", "adapter_up"):
                numel = math.prod(c.shape[1] for c in self._cores[key][part])
                if numel != d * self.rank:
                    raise AdapterMismatchError(
                        f"{where(self.source, key_name(key) + '.' + part + '.cores')}: mode sizes multiply to {numel}, "
                        f"expected hidden_size {d} x bottleneck_size {self.rank} = {d * self.rank}")

    def dense_equivalent_params(self) -> int:
        d = self.require_spec("the dense-equivalent size").hidden_size
        return len(self.targets) * (2 * d * self.rank + self.rank + d)

    def describe(self):
        return {"bottleneck_size": self.rank, "tensor_rank": self.config["tensor_rank"],
                "non_linearity": self.config["non_linearity"], "scaling": self.config["scaling"]}
