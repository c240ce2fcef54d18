"""Bucket: the compact per-slot tables of adapters of one family and shape, and their apply for one layer.

Adapters whose factors have the same shapes share a bucket; each adapter held in a vLLM slot owns one row of its
bucket's tables (rows are reused lowest-first, so the active rows stay dense and usually need no gather). A row holds
the adapter's own factors, materialized where that is cheaper to apply (TT cores contracted, scalings folded), never
a per-layer dense delta. Tables grow by doubling as adapters are activated: an engine with many slots reserves
nothing until adapters arrive.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...adapters import Adapter, ModelSpec
from ..batch_plan import BucketGroup


@dataclass
class LayerCall:
    """One wrapped linear layer's forward, as the buckets see it. A bucket's apply adds per-module deltas for its
    group's tokens; `commit` then writes them into the output with one row-wise index_add over the full width
    (an index_add into a column slice of the output takes a slow scatter path)."""

    layer: int
    modules: dict[str, slice]           # sub-module name -> its columns in the layer's output (q/k/v, gate/up)
    x: torch.Tensor                     # [T, in] the layer input
    output: torch.Tensor                # [T, out] the base output, updated in place
    compute_dtype: torch.dtype
    weight_of: callable                 # module name -> frozen weight rows [out_m, in] in compute_dtype (bat, adp)
    _x_compute: torch.Tensor | None = field(default=None, repr=False)
    _pending: dict = field(default_factory=dict, repr=False)

    @property
    def x_compute(self) -> torch.Tensor:
        if self._x_compute is None:
            self._x_compute = self.x.to(self.compute_dtype)
        return self._x_compute

    def add(self, module: str, group: BucketGroup, padded_delta: torch.Tensor) -> None:
        """Delta of one sub-module in the padded [C, G, out_m] layout."""
        self._pending[module] = group.real_rows(padded_delta)

    def add_rows(self, module: str, rows: torch.Tensor) -> None:
        """Delta of one sub-module, one row per token of the group, in the group's token order."""
        self._pending[module] = rows

    def add_fused(self, group: BucketGroup, padded_delta: torch.Tensor) -> None:
        """Delta of every sub-module at once, [C, G, out] in the layer's output layout."""
        self._pending[None] = group.real_rows(padded_delta)

    def commit(self, group: BucketGroup) -> None:
        if not self._pending:
            return
        if None in self._pending:
            delta = self._pending[None]
        else:
            n = group.tokens.numel()
            parts = [self._pending.get(m) for m in self.modules]
            parts = [p if p is not None else self.output.new_zeros(n, s.stop - s.start, dtype=self.compute_dtype)
                     for p, s in zip(parts, self.modules.values())]
            delta = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        self.output.index_add_(0, group.tokens, delta.to(self.output.dtype))
        self._pending.clear()


class Bucket(ABC):
    family: ClassVar[str]

    def __init__(self, signature: tuple, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        self.signature, self.spec, self.dtype, self.device = signature, spec, dtype, device
        self.tables: dict[str, torch.Tensor] = {}
        self.capacity = 0
        self._free: list[int] = []  # a heap of released rows below the high-water mark
        self._high_water = 0
        self.rows_in_use = 0

    # --- what the family defines --------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def signature_of(cls, adapter: Adapter) -> tuple:
        """Adapters with equal signatures have tables of equal shapes and share a bucket."""

    @abstractmethod
    def row_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """The adapter's factors as this bucket stores them (one row of each table)."""

    @abstractmethod
    def adapts(self, layer: int, module: str) -> bool:
        """Whether adapters of this bucket change (layer, module)."""

    @abstractmethod
    def apply(self, call: LayerCall, group: BucketGroup) -> None:
        """Add the update of the group's tokens to call.output."""

    # --- rows -----------------------------------------------------------------------------------------------------
    def allocate(self, adapter: Adapter, max_rows: int) -> int:
        with torch.no_grad():
            values = {k: v.detach().to(self.device, self.dtype) for k, v in self.row_tensors(adapter).items()}
        if self._free:
            row = heapq.heappop(self._free)
        else:
            row, self._high_water = self._high_water, self._high_water + 1
        if row >= self.capacity:
            self._grow(values, min(max(1, 2 * self.capacity), max_rows))
        for name, value in values.items():
            self.tables[name][row].copy_(value)
        self.rows_in_use += 1
        return row

    def release(self, row: int) -> None:
        self.rows_in_use -= 1
        if self.rows_in_use == 0:  # an idle bucket gives its memory back
            self.tables, self.capacity, self._free, self._high_water = {}, 0, [], 0
        else:
            heapq.heappush(self._free, row)

    def _grow(self, example: dict[str, torch.Tensor], capacity: int) -> None:
        grown = {}
        for name, value in example.items():
            table = torch.zeros((capacity, *value.shape), dtype=self.dtype, device=self.device)
            if name in self.tables:
                table[: self.capacity].copy_(self.tables[name])
            grown[name] = table
        self.tables, self.capacity = grown, capacity

    def bytes_per_row(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tables.values()) if self.capacity else 0

    def rows(self, name: str, group: BucketGroup) -> torch.Tensor:
        return group.rows_of(self.tables[name])


class PerModuleBucket(Bucket):
    """A family with factors per (layer, module): the last item of its signature is the adapter's targets."""

    def __init__(self, signature: tuple, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        super().__init__(signature, spec, dtype, device)
        self._targets = frozenset(signature[-1])

    def adapts(self, layer: int, module: str) -> bool:
        return (layer, module) in self._targets

    def targeted(self, call: LayerCall) -> list[str]:
        """The call's sub-modules this bucket changes, in output order."""
        return [m for m in call.modules if (call.layer, m) in self._targets]
