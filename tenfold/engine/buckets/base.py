"""Bucket: the compact per-slot tables of adapters of one family and shape, and their apply for one layer.

Adapters whose factors have the same shapes share a bucket; each adapter held in a vLLM slot owns one row of its
bucket's tables (rows are reused lowest-first, so the active rows stay dense and usually need no gather). A row holds
the adapter's own factors, materialized where that is cheaper to apply (TT cores contracted, scalings folded), never
a per-layer dense delta. A bucket's tables are reserved in the engine's adapter memory (`adapter_memory.py`) for
one row per vLLM slot when its first adapter arrives, and stay at that address while the bucket lives.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from ...adapters import Adapter, ModelSpec
from ..adapter_memory import PackedTables
from ..batch_plan import BucketGroup
from ..sharding import Shard


class LayerCall:
    """One wrapped linear layer's forward, as the buckets see it. A bucket's apply adds per-module deltas for its
    group's tokens; `commit` then writes them into the output with one row-wise index_add over the full width
    (an index_add into a column slice of the output takes a slow scatter path). A plain slotted class: one is made
    per wrapped layer and step, so its construction is on the hot path."""

    __slots__ = ("layer", "modules", "x", "output", "compute_dtype", "weight_of", "scratch", "_x_compute",
                 "_pending")

    def __init__(self, layer: int, modules: dict[str, slice], x: torch.Tensor, output: torch.Tensor | None,
                 compute_dtype: torch.dtype, weight_of: Callable[[str], torch.Tensor]):
        self.layer = layer                   # decoder layer index
        self.modules = modules               # sub-module name -> its columns in the output (q/k/v, gate/up)
        self.x = x                           # [T, in] the layer input (the adapters' input, never modified)
        self.output = output                 # [T, out] the base output, updated in place (None before the GEMM)
        self.compute_dtype = compute_dtype
        self.weight_of = weight_of           # module -> frozen weight rows [out_m, in] (bat, adp; SlotStore.frozen_dtype)
        self.scratch: dict = {}              # what a bucket's adapt_input leaves for its apply, keyed by bucket
        self._x_compute: torch.Tensor | None = None
        self._pending: dict = {}

    @property
    def x_rows(self) -> torch.Tensor:
        """call.x with contiguous rows, as tenfold's CPU kernels read it (in its own dtype)."""
        return self.x if self.x.stride(-1) == 1 else self.x.contiguous()

    @property
    def x_compute(self) -> torch.Tensor:
        if self._x_compute is None:
            self._x_compute = self.x if self.x.dtype == self.compute_dtype else self.x.to(self.compute_dtype)
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
        pending = self._pending
        if not pending:
            return
        delta = pending.get(None)
        if delta is None:
            if len(self.modules) == 1:
                (delta,) = pending.values()
            else:
                n = group.tokens.numel()
                parts = [pending.get(m) for m in self.modules]
                parts = [p if p is not None else self.output.new_zeros(n, s.stop - s.start, dtype=self.compute_dtype)
                         for p, s in zip(parts, self.modules.values())]
                delta = torch.cat(parts, -1)
        self.output.index_add_(0, group.tokens, delta if delta.dtype == self.output.dtype else
                               delta.to(self.output.dtype))
        pending.clear()


def adapt_layer_input(plan: list, call: LayerCall) -> torch.Tensor:
    """The base GEMM's input for a step's plan [(bucket, group)]: call.x, with the rows of the tokens whose buckets
    change the layer's input changed (in a copy)."""
    inputs = call.x
    for bucket, group in plan:
        inputs = bucket.adapt_input(call, group, inputs)
    return inputs


def add_layer_updates(plan: list, call: LayerCall) -> None:
    """Each bucket of the plan adds its tokens' update to call.output (the base GEMM's result), in place."""
    for bucket, group in plan:
        bucket.apply(call, group)
        call.commit(group)


def adapted_forward(plan: list, layer: int, modules: dict[str, slice], x: torch.Tensor,
                    base_forward: Callable[[torch.Tensor], torch.Tensor], compute_dtype: torch.dtype,
                    weight_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """One wrapped layer's forward for a step's plan [(bucket, group)]: the buckets may change the base GEMM's input
    rows of their tokens, the base GEMM runs once for all tokens, then each bucket adds its update."""
    call = LayerCall(layer, modules, x, None, compute_dtype, weight_of)
    call.output = base_forward(adapt_layer_input(plan, call))
    add_layer_updates(plan, call)
    return call.output


def add_output_updates(plan: list, layer: int, modules: dict[str, slice], output: torch.Tensor,
                       bias: torch.Tensor | None, compute_dtype: torch.dtype,
                       weight_of: Callable[[str], torch.Tensor]) -> None:
    """The updates of the plan's buckets that read the layer's whole output (+ its separately returned bias),
    added to `output` [T, out] in place: after `adapted_forward`, and after vLLM's all-reduce for row-parallel
    layers."""
    plan = [(b, g) for b, g in plan if b.reads_output]
    if not plan:
        return
    # the updates read `output` as it is being updated: safe, since each bucket reads and writes only its own
    # tokens' rows, and computes all of them before its commit
    call = LayerCall(layer, modules, output if bias is None else output + bias, output, compute_dtype, weight_of)
    for bucket, group in plan:
        bucket.apply_reduced(call, group)
        call.commit(group)


class Bucket(ABC):
    family: ClassVar[str]
    reads_output: ClassVar[bool] = False  # whether the family has updates that read a layer's whole output
    # whether gathered (non-consecutive) rows are kept for the step: yes for families whose tables are shared by
    # every layer (small); per-layer tables are gathered per call rather than all held at once
    keep_gathered_rows: ClassVar[bool] = False
    # whether the family has an apply on tenfold's CPU kernels (`tenfold.kernels.cpu`), which read its tables in
    # the model's dtype; the others compute with torch ops in the store's compute dtype (fp32 on CPU)
    has_cpu_kernels: ClassVar[bool] = False
    # whether the tables hold one row more than the slots, zeros that no adapter is written into: what the step's
    # tokens outside a group read where an apply runs over every token (LoRTA's in-place expand), so that they never
    # read another adapter's row, not even under a zero weight (a family sets it per bucket, before its tables)
    zero_row = False

    def __init__(self, signature: tuple, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 shard: Shard | None = None, cpu_kernels: bool = False):
        self.signature, self.spec, self.dtype, self.device = signature, spec, dtype, device
        self.cpu_kernels = cpu_kernels  # apply with tenfold's CPU kernels (the store decides: device, model dtype)
        self.shard = shard or Shard(spec)  # row_tensors keep this tensor-parallel rank's part of each factor
        self._packed: PackedTables | None = None  # the tables, in the engine's adapter memory
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
        """The adapter's factors as this bucket stores them (one row of each table), sharded like the layers of
        this tensor-parallel rank (`self.shard`)."""

    @abstractmethod
    def adapts(self, layer: int, module: str) -> bool:
        """Whether adapters of this bucket change (layer, module)."""

    @abstractmethod
    def apply(self, call: LayerCall, group: BucketGroup) -> None:
        """Add the update of the group's tokens to call.output."""

    def apply_reduced(self, call: LayerCall, group: BucketGroup) -> None:
        """Add an update that reads the layer's whole output, here call.x (call.output is the same values, updated
        in place): run after a row-parallel layer's all-reduce, on every rank alike, and right after the layer's
        own update otherwise (families with `reads_output`)."""

    @classmethod
    def may_adapt_input(cls, module: str) -> bool:
        """Whether adapters of this family can change the input of module's base GEMM (`adapt_input`): fixed per
        module, so a compiled layer calls tenfold's input op only where some family may need it."""
        return False

    def adapt_input(self, call: LayerCall, group: BucketGroup, inputs: torch.Tensor) -> torch.Tensor:
        """The base GEMM's input: `inputs` (call.x, or what an earlier bucket made of it) with this bucket's tokens
        changed where the family adapts the layer input itself; never modifies call.x in place."""
        return inputs

    # --- rows -----------------------------------------------------------------------------------------------------
    def frozen_weights(self) -> set[tuple[int, str]]:
        """The (layer, module) pairs whose frozen weight this bucket's applies read (bat, loretta_adp)."""
        return set()

    def row_values(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """The adapter's row of every table, on the device in the table dtype."""
        with torch.no_grad():
            return {k: v.detach().to(self.device, self.dtype) for k, v in self.row_tensors(adapter).items()}

    def table_shapes(self, values: dict[str, torch.Tensor], capacity: int) -> dict[str, tuple[int, ...]]:
        """The shapes of this bucket's tables for `capacity` adapters, from one adapter's `row_values` (and the
        zero row after them, where the family has one)."""
        return {name: (capacity + self.zero_row, *value.shape) for name, value in values.items()}

    def take_tables(self, packed: PackedTables) -> None:
        """Hold the tables reserved for this bucket (one row per vLLM slot), for the bucket's whole life."""
        self._packed = packed
        self.capacity = next(iter(packed.shapes.values()))[0] - self.zero_row  # the zero row (if any): row capacity

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        return self._packed.views if self._packed is not None else {}

    @property
    def packed(self) -> PackedTables | None:
        return self._packed

    def allocate(self, values: dict[str, torch.Tensor]) -> int:
        """Copy an adapter's `row_values` into a free row (the tables are taken already)."""
        if self._free:
            row = heapq.heappop(self._free)
        else:
            row, self._high_water = self._high_water, self._high_water + 1
        if row >= self.capacity:
            raise RuntimeError(f"tenfold: a bucket of {self.capacity} rows was asked for row {row}, but it has one row "
                               f"per vLLM slot")
        tables = self.tables
        for name, value in values.items():
            tables[name][row].copy_(value)
        self.rows_in_use += 1
        return row

    def release(self, row: int) -> None:
        """Free a row, cleared to zeros: nothing reads a freed row, and no later tenant of it (nor a bug that reads
        it) sees the previous adapter's values. An idle bucket keeps its tables (and addresses) until the store
        needs the memory."""
        for table in self.tables.values():
            table[row].zero_()
        self.rows_in_use -= 1
        heapq.heappush(self._free, row)
        if self.rows_in_use == 0:
            self._free, self._high_water = [], 0

    def free_tables(self) -> None:
        """Give an idle bucket's tables back to their arena (the store drops the bucket)."""
        if self._packed is not None:
            self._packed.release()
        self._packed, self.capacity = None, 0

    def describe(self) -> str:
        return " ".join(str(part) for part in self.signature[:-1] if not isinstance(part, (tuple, list)))

    def bytes_per_row(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tables.values()) if self.capacity else 0

    def rows(self, name: str, group: BucketGroup, layer: int | None = None) -> torch.Tensor:
        """Per-chunk rows [C, ...] of table `name` (of one layer, for tables with a layer axis after the row).
        Kept on the group for the step: every layer reads the same rows, so the slicing (or, for scattered rows, the
        gather of a layer-shared table) happens once per step rather than once per layer call."""
        key = name if layer is None else (name, layer)
        found = group.views.get(key)
        if found is None:
            found = group.views.get(name)
            if found is None:
                found = group.rows_of(self.tables[name])
                if self.keep_gathered_rows or group.row_range is not None:
                    group.views[name] = found
            if layer is not None:
                found = found[:, layer]
                group.views[key] = found
        return found


class PerModuleBucket(Bucket):
    """A family with factors per (layer, module): the last item of its signature is the adapter's targets."""

    def __init__(self, signature: tuple, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 shard: Shard | None = None, cpu_kernels: bool = False):
        super().__init__(signature, spec, dtype, device, shard, cpu_kernels)
        self._targets = frozenset(signature[-1])

    def adapts(self, layer: int, module: str) -> bool:
        return (layer, module) in self._targets

    def targeted(self, call: LayerCall) -> list[str]:
        """The call's sub-modules this bucket changes, in output order."""
        return [m for m in call.modules if (call.layer, m) in self._targets]
