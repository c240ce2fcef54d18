"""What a family declares once, as `DECLARATION` in its package's `__init__.py`: how its official checkpoints are
recognised and read, which serving table holds it, and its typical size for `tenfold bench`. The registry
(`registry.py`), the engine's bucket table (`engine/buckets`) and the bench's settings are built from these, so a
new family is its folder here, its bucket file and any new kernel (README: "Adding a family")."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .base import Adapter


@dataclass(frozen=True)
class ReadOptions:
    """Settings a user gives beside a checkpoint, for the readers that need them."""
    lorta_orientation: str | None = None  # the LoRTA fork's heads axis (`TENFOLD_LORTA_ORIENTATION`)


@dataclass(frozen=True)
class FamilyDeclaration:
    adapter: type[Adapter]
    # the `peft_type` values of its official checkpoints (the unknown-type error lists them all)
    peft_types: tuple[str, ...]
    # whether an adapter_config.json with one of those peft_types is this family's (several families share LORA and
    # MISS: each tells its own apart; exactly one may claim a config)
    claims: Callable[[dict], bool]
    # (config, its path) -> {config key: rank}: every setting audited and every value it reads checked, before any
    # tensor is read; the ranks returned size a serving table or a contraction (bounded by --max-lora-rank)
    check: Callable[[dict, Path], dict[str, int]]
    # (config that `check` accepted, tensors, weights file, options) -> the adapter
    read: Callable[[dict, dict, Path, ReadOptions], Adapter]
    # "module:Class" of its serving table; imported by the engine, which sits above this package
    bucket: str
    # `tenfold bench`'s typical size (synthetic adapters); anything not named is `create`'s default
    bench_settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.adapter.family


def declarations() -> dict[str, FamilyDeclaration]:
    """Every family package's declaration, by family name (the packages in alphabetical order)."""
    found = {}
    for module in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.ispkg):
        declaration = getattr(importlib.import_module(f"{__package__}.{module}"), "DECLARATION", None)
        if declaration is not None:
            found[declaration.name] = declaration
    return found


def import_bucket(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
