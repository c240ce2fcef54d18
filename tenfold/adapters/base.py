"""The family interface: one adapter = one torch module holding its factors under tenfold's tensor names.

A family implements the math once and everything else uses it:
- `delta(key)`: the dense weight update of one (layer, module) — the reference, never used on hot paths;
- `lora_factors(key)`: the exact LoRA form (A [r, in], B [out, r], scaling folded into B) where one exists;
- `forward(key, x, base)`: the module's output with the adapter, computed from the factors on the fly; this is what
  `attach` runs in a HuggingFace model, for inference and for training;
- `validate(spec)`: shapes against a base model, beyond the generic finite/dtype checks done here.
Tensor names are dotted (``layers.3.q_proj.lora_A``) in files and in `tensors()`; inside the ParameterDict the dots
become ':' because torch forbids dots in parameter names.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterKeyError, AdapterMismatchError, AdapterValueError, NoExactLoRAError, where
from .spec import ModelSpec
from .values import Values

ModuleKey = tuple[int, str]  # (layer index, module name such as "q_proj")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KEY = re.compile(r"^layers\.(\d+)\.(\w+)$")


def key_name(key: ModuleKey) -> str:
    return f"layers.{key[0]}.{key[1]}"


def parse_key_name(name: str) -> ModuleKey:
    m = _KEY.match(name)
    if not m:
        raise AdapterKeyError(f"not a module key: {name[:120]!r} (expected 'layers.<i>.<module>')")
    return int(m.group(1)), m.group(2)


class Adapter(nn.Module, ABC):
    family: ClassVar[str]
    has_exact_lora: ClassVar[bool] = True

    def __init__(self, config: dict, spec: ModelSpec | None = None, source=None):
        super().__init__()
        self.config = dict(config)
        self.spec = spec
        self.source = source  # the file the tensors came from, for error messages
        self._factors = nn.ParameterDict()

    # --- tensors -------------------------------------------------------------------------------------------------
    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        self._factors[name.replace(".", ":")] = nn.Parameter(value, requires_grad=value.is_floating_point())

    def tensor(self, name: str) -> torch.Tensor:
        return self._factors[name.replace(".", ":")]

    def has_tensor(self, name: str) -> bool:
        return name.replace(".", ":") in self._factors

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k.replace(":", "."): v for k, v in self._factors.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._factors.values())).dtype

    # --- the family's settings ------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def check_config(cls, values: Values) -> dict[str, int]:
        """Every value of the family's own config checked (`values` reads it, as tenfold's format holds it in
        "config"); {key: rank} of the ranks that size its serving table or a contraction."""

    def densified_entries(self) -> tuple[int, str]:
        """(values, what they are) of the largest form tenfold computes from the factors beyond the factors
        themselves (TT cores contracted, a per-layer LoRA form, a tiled block), from the bound spec's shapes;
        (0, "") when nothing is."""
        return 0, ""

    # --- the family's math ---------------------------------------------------------------------------------------
    @property
    def targets(self) -> list[ModuleKey]:
        """The (layer, module) pairs this adapter changes, sorted (per-module families set `_targets`)."""
        return self._targets

    @property
    @abstractmethod
    def rank(self) -> int:
        """The family's rank hyperparameter (LoRA r, CP rank, block size, bottleneck size)."""

    @abstractmethod
    def delta(self, key: ModuleKey, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Dense weight update [out, in] of one module (reference only)."""

    @abstractmethod
    def forward(self, key: ModuleKey, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Output of `base` on `x` with this adapter applied, without materializing a dense delta."""

    def lora_factors(self, key: ModuleKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) with B @ A == delta(key) exactly (scaling folded into B)."""
        raise NoExactLoRAError(
            f"{self.family} has no exact LoRA form: its update is not a fixed low-rank matrix. tenfold serves it on "
            f"the native path; conversion to LoRA would be lossy and is refused")

    @property
    def largest_lora_rank(self) -> int:
        """The rank of the widest `lora_factors` over its modules (a LoRA may vary it per module)."""
        return self.rank

    def dense_equivalent_params(self) -> int:
        """Parameters of the same update written out per layer and module (LoRA at this rank, or the untensorized
        bottleneck for adapters): what a per-layer format would store."""
        spec = self.require_spec("the dense-equivalent size")
        return sum(self.rank * sum(spec.module_shape(m)) for _, m in self.targets)

    # --- validation ----------------------------------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> None:
        """Check the adapter against a base model; binds the spec on success."""
        dtypes = {}  # tensors of more than one value, by dtype: the family's products need one dtype
        for name, value in self.tensors().items():
            if value.dtype not in FLOAT_DTYPES:
                raise AdapterValueError(
                    f"{where(self.source, name)}: expected a floating-point tensor, found dtype {value.dtype}")
            if not torch.isfinite(value).all():
                bad = (~torch.isfinite(value)).sum().item()
                raise AdapterValueError(f"{where(self.source, name)}: {bad} NaN/Inf values; an adapter must be finite")
            if value.numel() > 1:
                dtypes.setdefault(value.dtype, name)
        if len(dtypes) > 1:
            (first, a), (second, b) = list(dtypes.items())[:2]
            raise AdapterValueError(f"{where(self.source, b)}: expected every factor in one dtype, found {second} here "
                                    f"and {first} in {a!r}")
        for layer, module in self.targets:
            spec.check_layer(layer, where(self.source))
            if module not in spec.shapes:
                raise AdapterKeyError(
                    f"{where(self.source)}: tensors for layers.{layer}.{module} match no module of the base model: "
                    f"expected one of {', '.join(spec.shapes)}")
        self._check_coverage(spec)
        self._validate(spec)
        self.spec = spec

    def _check_coverage(self, spec: ModelSpec) -> None:
        """The tensors must cover exactly the modules the config targets: a checkpoint that silently applies to only
        part of what it claims, or to modules its config excludes, is refused. `targeting` (set by the readers of
        foreign formats) holds the producer's own rule and keys; older tenfold files list target_modules (and
        layers)."""
        from .settings import targeted_set

        targeting = self.config.get("targeting")
        if targeting:
            expected = targeted_set(targeting, spec.num_layers, tuple(spec.shapes))
            described = {k: v for k, v in targeting.items() if k not in ("rule", "path_template", "blocks") and v}
        else:
            modules = self.config.get("target_modules")
            if not isinstance(modules, list):
                return
            layers = self.config.get("layers") or range(spec.num_layers)
            expected = {(layer, m) for layer in layers for m in modules}
            described = {"target_modules": sorted(modules), "layers": f"{list(layers)[0]}..{list(layers)[-1]}"}
        have = set(self.targets)
        missing, extra = sorted(expected - have), sorted(have - expected)
        if missing or extra:
            raise AdapterKeyError(
                f"{where(self.source)}: the tensors cover only part of the targeted modules: missing "
                f"{[key_name(k) for k in missing[:6]]}{' ...' if len(missing) > 6 else ''}, not targeted by the config "
                f"{[key_name(k) for k in extra[:6]]}{' ...' if len(extra) > 6 else ''}; expected tensors for "
                f"{len(expected)} modules ({described})")

    @abstractmethod
    def _validate(self, spec: ModelSpec) -> None:
        """Family-specific shape checks; raise AdapterMismatchError naming key, expected and found."""

    def require_spec(self, what: str) -> ModelSpec:
        if self.spec is None:
            raise AdapterMismatchError(f"{what} of a {self.family} adapter needs the base model's shapes: validate it "
                                       f"against a base model first (or pass --base)")
        return self.spec

    def expect_shape(self, name: str, expected: tuple, found: tuple | None = None) -> None:
        found = tuple(self.tensor(name).shape) if found is None else tuple(found)
        if tuple(expected) != found:
            raise AdapterMismatchError(
                f"{where(self.source, name)}: expected shape {list(expected)} for this base model, found {list(found)}")

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def target_modules(self) -> list[str]:
        return sorted({m for _, m in self.targets})

    def describe(self) -> dict:
        """Family hyperparameters shown by `tenfold inspect` beside the rank."""
        return {}


class LowRankAdapter(Adapter):
    """A family whose update is exactly B @ A per module: delta and the on-the-fly forward follow from lora_factors."""

    @abstractmethod
    def lora_factors(self, key: ModuleKey) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def delta(self, key, base_weight=None):
        a, b = self.lora_factors(key)
        return b @ a

    def forward(self, key, x, base):
        a, b = self.lora_factors(key)
        return base(x) + F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)
