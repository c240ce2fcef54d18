"""LoRETTA rep: a LoRA whose A and B are tensor trains.

Per module: cores of A's matrix [in, r] and of B's matrix [r, out] (LoRETTA's x @ W convention), so in LoRA terms
A = tt(A cores)^T [r, in], B = tt(B cores)^T [out, r], delta = (alpha / r) * B @ A: exactly low-rank.
Tensor names: layers.<i>.<module>.lora_A.cores.<k> and ...lora_B.cores.<k>.
"""

from __future__ import annotations

import math
import re

import torch

from ..base import LowRankAdapter, key_name, parse_key_name
from ..errors import AdapterMismatchError, where
from ..settings import check_targeting
from ..tt import check_cores, contraction_size, mode_product, random_cores, tt_matrix

_CORE = re.compile(r"^(layers\.\d+\.\w+)\.(lora_A|lora_B)\.cores\.(\d+)$")


def collect_cores(tensors: dict, parts: tuple[str, ...], source) -> dict:
    """{(layer, module): {part: [core0, core1, ...]}} from '<key>.<part>.cores.<k>' names; core indices must be
    0..K-1 without gaps."""
    found: dict = {}
    for name, value in tensors.items():
        m = re.match(rf"^(layers\.\d+\.\w+)\.({'|'.join(parts)})\.cores\.(\d+)$", name)
        if m is None:
            continue
        found.setdefault(parse_key_name(m.group(1)), {}).setdefault(m.group(2), {})[int(m.group(3))] = value
    result = {}
    for key, by_part in found.items():
        result[key] = {}
        for part, cores in by_part.items():
            if sorted(cores) != list(range(len(cores))):
                raise AdapterMismatchError(f"{where(source, key_name(key) + '.' + part)}: TT core indices must be "
                                           f"0..{len(cores) - 1}, found {sorted(cores)}")
            result[key][part] = [cores[k] for k in range(len(cores))]
    return result


def densified_cores(cores: dict) -> int:
    """Entries of every contracted matrix of {key: {part: cores}}, plus the largest intermediate result."""
    sizes = [contraction_size(part_cores) for parts in cores.values() for part_cores in parts.values()]
    return sum(out for out, _ in sizes) + max((peak for _, peak in sizes), default=0)


class LoRETTARep(LowRankAdapter):
    family = "loretta_rep"

    def __init__(self, config: dict, tensors: dict, spec=None, source=None):
        super().__init__(config, spec, source)
        stray = [n for n in tensors if not _CORE.match(n)]
        if stray:
            raise AdapterMismatchError(f"{where(source, stray[0])}: not a LoRETTA rep core name "
                                       f"(layers.<i>.<module>.lora_A|lora_B.cores.<k>)")
        for name, value in tensors.items():
            self.set_tensor(name, value)
        self._cores = collect_cores(tensors, ("lora_A", "lora_B"), source)
        for key, parts in self._cores.items():
            for part in ("lora_A", "lora_B"):
                if part not in parts:
                    raise AdapterMismatchError(f"{where(source, key_name(key) + '.' + part)}: missing; LoRETTA rep needs "
                                               f"both lora_A and lora_B cores for every module")
            r = self.rank
            for part in ("lora_A", "lora_B"):
                numel = mode_product(parts[part], source, f"{key_name(key)}.{part}.cores")
                if numel % r:
                    raise AdapterMismatchError(f"{where(source, key_name(key) + '.' + part)}: the cores' mode sizes "
                                               f"multiply to {numel}, which is not a multiple of r={r}")
                check_cores(parts[part], numel, source, f"{key_name(key)}.{part}.cores", config["tensor_rank"])
        self._targets = sorted(self._cores)

    @classmethod
    def create(cls, spec, target_modules=("q_proj", "v_proj"), r=8, lora_alpha=16.0, tensor_rank=5, init="random",
               seed=0, dtype=torch.float32, scale=0.1):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(spec.num_layers):
            for m in target_modules:
                fan_in, fan_out = spec.module_shape(m)
                parts = {"lora_A": random_cores(fan_in * r, tensor_rank, 1 / math.sqrt(fan_in), g),
                         "lora_B": random_cores(r * fan_out, tensor_rank, scale / math.sqrt(r), g, zero_last=init != "random")}
                for part, cores in parts.items():
                    for k, core in enumerate(cores):
                        tensors[f"layers.{layer}.{m}.{part}.cores.{k}"] = core.to(dtype)
        config = {"r": r, "lora_alpha": float(lora_alpha), "tensor_rank": tensor_rank,
                  "target_modules": sorted(target_modules)}
        return cls(config, tensors, spec)

    @classmethod
    def check_config(cls, values):
        ranks = {"r": values.int("r"), "tensor_rank": values.int("tensor_rank")}
        values.number("lora_alpha")
        values.names("target_modules")
        check_targeting(values)
        return ranks

    def densified_entries(self):
        return densified_cores(self._cores), f"contracting its TT cores (rank {self.rank} A and B of each module)"

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    def cores(self, key, part):
        n = len(self._cores[key][part])
        return [self.tensor(f"{key_name(key)}.{part}.cores.{k}") for k in range(n)]

    def matrices(self, key):
        """(W_A [in, r], W_B [r, out]) contracted from the cores."""
        r = self.rank
        a_cores, b_cores = self.cores(key, "lora_A"), self.cores(key, "lora_B")
        fan_in = math.prod(c.shape[1] for c in a_cores) // r
        fan_out = math.prod(c.shape[1] for c in b_cores) // r
        return tt_matrix(a_cores, fan_in, r), tt_matrix(b_cores, r, fan_out)

    def lora_factors(self, key):
        w_a, w_b = self.matrices(key)
        return w_a.t(), w_b.t() * (self.config["lora_alpha"] / self.rank)

    def _validate(self, spec):
        for key in self.targets:
            fan_in, fan_out = spec.module_shape(key[1])
            for part, numel in (("lora_A", fan_in * self.rank), ("lora_B", self.rank * fan_out)):
                found = math.prod(c.shape[1] for c in self.cores(key, part))
                if found != numel:
                    raise AdapterMismatchError(
                        f"{where(self.source, key_name(key) + '.' + part + '.cores')}: mode sizes multiply to {found}, "
                        f"expected {numel} ({'in' if part == 'lora_A' else 'out'} width x r={self.rank}) for this base model")

    def describe(self):
        return {"lora_alpha": self.config["lora_alpha"], "tensor_rank": self.config["tensor_rank"]}
