"""LoRTA: one CP-decomposed tensor holds the updates of every layer, attention matrix and head.

Factors (the PEFT fork's names): A [d, r], B [r, d_h], C_l [L, r], C_h [H, r], C_m [4, r] (q, k, v, o), scaling
alpha/r (alpha/sqrt(r) with use_rslora; the fork reader folds per-module scalings and layers_to_transform into C_l and
C_m, see format.py). For layer l, matrix m and head h the weights are c = C_h[h] * C_m[m] * C_l[l] (length r). Two orientations
exist in the wild:
- ``heads_in`` (the PEFT fork: y += x @ delta^T): heads index the input columns,
  dy = s * A diag(C_m[m] C_l[l]) sum_h diag(C_h[h]) B x_h. The shrink sum_h diag(C_h[h]) B x_h is the same for every
  layer and matrix that reads the same input.
- ``heads_out`` (the lit-gpt trainer: y += x @ delta): heads index the output rows,
  dy_h = s * B^T diag(c_h) A^T x. The shrink A^T x is shared by every matrix that reads the same input (q, k, v).
Both require q and o to be square (num_heads * head_dim == hidden_size).

Grouped-query attention (not covered by the official code, defined here): the k and v projections have only
num_kv_heads output heads. Wherever a head axis lands on the k/v output, each key/value head takes the mean of the
factors of the query heads in its group (query head h reads key/value head h // group_size, as in HuggingFace's
repeat_kv): in ``heads_out`` the head factor C_h is group-averaged; in ``heads_in`` the rows of A, seen as [H, d_h, r],
are group-averaged. The averaging is linear, so the update stays exactly low-rank (rank <= r) and on multi-head
models it is the identity.
"""

from __future__ import annotations

import math

import torch

from ..base import LowRankAdapter
from ..errors import AdapterMismatchError, where
from ..values import REQUIRED

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj")
ORIENTATIONS = ("heads_in", "heads_out")
NAMES = ("lora_A", "lora_B", "lora_C_l", "lora_C_h", "lora_C_m")


class LoRTA(LowRankAdapter):
    family = "lorta"

    def __init__(self, config: dict, tensors: dict, spec=None, source=None):
        super().__init__(config, spec, source)
        missing = [n for n in NAMES if n not in tensors]
        extra = sorted(set(tensors) - set(NAMES))
        if missing or extra:
            raise AdapterMismatchError(f"{where(source)}: LoRTA needs exactly the tensors {list(NAMES)}: missing "
                                       f"{missing}, unexpected {extra[:5]}")
        for name in NAMES:
            if tensors[name].dim() != 2:
                raise AdapterMismatchError(f"{where(source, name)}: expected a matrix, found shape "
                                           f"{list(tensors[name].shape)}")
            self.set_tensor(name, tensors[name])
        if config.get("orientation") not in ORIENTATIONS:
            raise AdapterMismatchError(f"{where(source)}: LoRTA orientation must be one of {ORIENTATIONS}, found "
                                       f"{config.get('orientation')!r}")
        bad = [m for m in config["target_modules"] if m not in MATRICES]
        if bad:
            raise AdapterMismatchError(f"{where(source)}: LoRTA targets the attention matrices {MATRICES} only, found "
                                       f"target_modules {bad}")

    @classmethod
    def create(cls, spec, target_modules=MATRICES, r=16, lora_alpha=16.0, orientation="heads_out", init="random",
               seed=0, dtype=torch.float32, scale=0.1):
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape, std: torch.randn(*shape, generator=g, dtype=dtype) * std  # noqa: E731
        b = rand(r, spec.head_dim, std=scale / math.sqrt(r))
        tensors = {
            "lora_A": rand(spec.hidden_size, r, std=1 / math.sqrt(spec.hidden_size)),
            "lora_B": b if init == "random" else torch.zeros_like(b),
            "lora_C_l": 1 + rand(spec.num_layers, r, std=0.5),
            "lora_C_h": 1 + rand(spec.num_heads, r, std=0.5),
            "lora_C_m": 1 + rand(4, r, std=0.5),
        }
        config = {"r": r, "lora_alpha": float(lora_alpha), "orientation": orientation,
                  "target_modules": sorted(target_modules)}
        return cls(config, tensors, spec)

    @classmethod
    def check_config(cls, values):
        ranks = {"r": values.int("r")}
        values.number("lora_alpha")
        values.choice("orientation", ORIENTATIONS)
        values.flag("use_rslora")
        values.number("scale", None)
        targets = values.names("target_modules", REQUIRED)
        if not targets or any(m not in MATRICES for m in targets):
            values.fail("target_modules", f"a non-empty list of the attention matrices {', '.join(MATRICES)}")
        values.layer_list("layers")
        return ranks

    def densified_entries(self):
        spec = self.require_spec("the LoRA form")
        entries = sum(self.rank * sum(spec.module_shape(m)) for _, m in self.targets)
        return entries, f"its per-layer LoRA form (rank {self.rank} for {len(self.targets)} modules)"

    @property
    def num_layers(self) -> int:
        return self.tensor("lora_C_l").shape[0]

    @property
    def targets(self):
        layers = self.config.get("layers")
        layers = range(self.num_layers) if layers is None else layers
        return [(layer, m) for layer in layers for m in sorted(self.config["target_modules"])]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        """The scaling of every update: the config's `scale` when a reader computed it (the fork's per-module
        scalings, folded into C_l and C_m where they differ), else alpha/r (alpha/sqrt(r) with use_rslora)."""
        if "scale" in self.config:
            return float(self.config["scale"])
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def _kv_grouped(self, module: str) -> int:
        """Query heads per output head of this module: the GQA group size for k/v, else 1."""
        if module in ("k_proj", "v_proj") and self.spec is not None:
            return self.spec.group_size
        return 1

    def shared_shrink(self) -> torch.Tensor:
        """The input-side factor [r, in] shared by every layer and matrix (LoRA A of the exact form)."""
        a, b, c_h = self.tensor("lora_A"), self.tensor("lora_B"), self.tensor("lora_C_h")
        if self.config["orientation"] == "heads_out":
            return a.t()
        # heads_in: block h of the input columns is diag(C_h[h]) B.
        return (c_h[:, :, None] * b[None]).permute(1, 0, 2).reshape(b.shape[0], -1)

    def expand(self, key) -> torch.Tensor:
        """The output-side factor [out, r] of one (layer, matrix), scaling folded in (LoRA B of the exact form)."""
        layer, module = key
        a, b = self.tensor("lora_A"), self.tensor("lora_B")
        c_l, c_h, c_m = self.tensor("lora_C_l"), self.tensor("lora_C_h"), self.tensor("lora_C_m")
        weight = c_m[MATRICES.index(module)] * c_l[layer] * self.scale  # [r]
        group = self._kv_grouped(module)
        if self.config["orientation"] == "heads_out":
            heads = c_h if group == 1 else c_h.reshape(-1, group, c_h.shape[1]).mean(1)  # [heads, r]
            # rows h*d_h + j: B[:, j] * heads[h] * weight
            return (heads[:, None, :] * b.t()[None] * weight).reshape(-1, b.shape[0])
        rows = a if group == 1 else a.reshape(-1, group, b.shape[1], a.shape[1]).mean(1).reshape(-1, a.shape[1])
        return rows * weight

    def lora_factors(self, key):
        return self.shared_shrink(), self.expand(key)

    def _validate(self, spec):
        if spec.num_heads * spec.head_dim != spec.hidden_size:
            raise AdapterMismatchError(
                f"{where(self.source)}: LoRTA needs square q and o projections (num_heads * head_dim == hidden_size); "
                f"the base model has {spec.num_heads} x {spec.head_dim} != {spec.hidden_size}")
        a = self.tensor("lora_A")
        if a.dim() == 2 and a.shape[1] != self.rank:
            raise AdapterMismatchError(f"{where(self.source, 'lora_A')}: config r is {self.rank}, the tensor has rank "
                                       f"{a.shape[1]}")
        r = self.rank
        expected = {"lora_A": (spec.hidden_size, r), "lora_B": (r, spec.head_dim), "lora_C_l": (spec.num_layers, r),
                    "lora_C_h": (spec.num_heads, r), "lora_C_m": (4, r)}
        for name, shape in expected.items():
            self.expect_shape(name, shape)

    def describe(self):
        extra = {"layers": self.config["layers"]} if self.config.get("layers") is not None else {}
        return {"lora_alpha": self.config["lora_alpha"], "orientation": self.config["orientation"],
                "scale": self.scale, **extra}
