"""The adapter memory budget: one block of device memory, reserved when the engine starts, that holds every slot
table and every frozen-weight copy of the native path.

It is allocated while vLLM loads the model (the LoRA model manager is built then), so on GPUs it counts as model
memory before vLLM sizes its KV cache, and adapters can never push a running engine out of memory. Tables are views
into it at fixed addresses: a bucket reserves its full capacity (one row per vLLM slot) when it is created and keeps
it, so loading and evicting adapters never moves a table (what graph capture needs). A reservation that does not fit
raises `AdapterMemoryError`, a clear error that names the budget and the flag that sets it.

The arena is also the ledger of what a step needed beyond the budget (a step that vLLM scheduled already is served
rather than refused): such tables live in memory of their own (`pack_beyond`), are counted in `beyond` (bytes held
over the budget now; `beyond_total` counts every byte ever placed there) until they are released or moved into the
budget (`take_back`).
"""

from __future__ import annotations

import argparse
import bisect
import os

import torch

from ..adapters import AdapterTooLargeError, ModelSpec

ENV = "TENFOLD_ADAPTER_MEMORY"  # GiB; set by `tenfold serve/bench --adapter-memory`, read in every worker
MIN_DEFAULT_BYTES = 512 << 20
ALIGNMENT = 64  # bytes: every view starts on a cache line, and any dtype's view of it is aligned


class AdapterMemoryError(AdapterTooLargeError):
    """What an adapter needs does not fit the engine's adapter memory budget."""


def parse_gib(value: str) -> float:
    """A budget in GiB as the flag takes it (argparse's `type`)."""
    try:
        gib = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of GiB") from None
    if not gib > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: the adapter memory budget must be positive (GiB)")
    return gib


def budget_from_env() -> int | None:
    """The budget the user asked for, in bytes (None: the default)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        return int(parse_gib(value) * (1 << 30))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{ENV}: {e}") from None


def stock_lora_bytes(spec: ModelSpec, slots: int, max_rank: int, element_size: int) -> int:
    """What vLLM's own LoRA reserves for the same flags: A and B at max_rank for every slot and linear module."""
    per_layer = sum(fan_in + fan_out for fan_in, fan_out in spec.shapes.values())
    return slots * max_rank * per_layer * spec.num_layers * element_size


def default_budget(spec: ModelSpec, slots: int, max_rank: int, element_size: int) -> int:
    """Twice what vLLM's LoRA would reserve for these flags (tenfold rows are at each adapter's own size, and
    several buckets may be live at once), at least 512 MiB."""
    return max(MIN_DEFAULT_BYTES, 2 * stock_lora_bytes(spec, slots, max_rank, element_size))


def engine_budget(spec: ModelSpec, slots: int, max_rank: int, element_size: int) -> int:
    """The budget of an engine: --adapter-memory if given, else the default."""
    return budget_from_env() or default_budget(spec, slots, max_rank, element_size)


def gib(nbytes: int) -> str:
    """A size for messages: GiB, or MiB below one GiB."""
    return f"{nbytes / (1 << 30):.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.2f} MiB"


class PackedTables:
    """Named tables packed in one range of an arena. `views` are rebuilt when the arena compacts (or the tables move
    into the budget): holders read them through this object (or re-read after a store change), never keep a view
    across one."""

    def __init__(self, arena: "AdapterArena", offset: int, shapes: dict, dtype: torch.dtype, what: str = ""):
        self.arena, self.offset, self.shapes, self.dtype, self.what = arena, offset, shapes, dtype, what
        self.offsets, self.size = table_layout(shapes, dtype)
        self.views = self._view()
        self.ledger: AdapterArena | None = None  # the budget that counts these tables while they live beyond it
        self.released = False

    @property
    def beyond_budget(self) -> bool:
        return self.ledger is not None

    def _view(self) -> dict:
        return {name: self.arena.view(self.offset + self.offsets[name], shape, self.dtype)
                for name, shape in self.shapes.items()}

    def moved(self, offset: int) -> None:
        self.offset = offset
        self.views = self._view()

    def release(self) -> None:
        self.arena.release(self.offset)
        if self.ledger is not None:
            self.ledger._beyond.pop(id(self))
            self.ledger = None
        self.released = True


class AdapterArena:
    """First-fit allocation of aligned byte ranges in one buffer; freed ranges merge with their neighbours, and
    `compact` slides every range down when free memory is enough but split."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = capacity - capacity % ALIGNMENT
        self.buffer = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, size), sorted
        self._used: dict[int, tuple[int, str, PackedTables | None]] = {}  # offset -> (size, what, owner)
        self._beyond: dict[int, PackedTables] = {}  # id -> tables placed beyond the budget and still held
        self.beyond_total = 0  # every byte ever placed beyond the budget (a counter, where `beyond` is a gauge)

    @property
    def used(self) -> int:
        return sum(size for size, _, _ in self._used.values())

    @property
    def beyond(self) -> int:
        """Bytes placed beyond the budget and held now (0 when everything fits it)."""
        return sum(packed.size for packed in self._beyond.values())

    @property
    def placed(self) -> int:
        """Every byte of tables placed: within the budget and beyond it."""
        return self.used + self.beyond

    def beyond_tables(self) -> list[PackedTables]:
        """The tables placed beyond the budget and held now, the oldest first."""
        return list(self._beyond.values())

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max((size for _, size in self._free), default=0)

    def fits(self, nbytes: int) -> bool:
        return _aligned(nbytes) <= self.largest_free

    def reserve(self, nbytes: int, what: str, owner: PackedTables | None = None) -> int:
        """The offset of a zeroed range of at least nbytes; raises AdapterMemoryError when none is free."""
        size = _aligned(max(nbytes, 1))
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                self._free[i:i + 1] = [(offset + size, free - size)] if free > size else []
                self._used[offset] = (size, what, owner)
                self.buffer[offset:offset + size].zero_()
                return offset
        raise AdapterMemoryError(
            f"{what} needs {gib(size)} of adapter memory, but the engine's budget of {gib(self.capacity)} has "
            f"{gib(self.free)} free (largest free range {gib(self.largest_free)}); start the engine with a larger "
            f"--adapter-memory (GiB), or fewer --max-loras (every bucket reserves one row per slot)")

    def pack(self, shapes: dict, dtype: torch.dtype, what: str) -> PackedTables:
        """Reserve one range for several tables (zeroed) and return them."""
        size = table_layout(shapes, dtype)[1]
        offset = self.reserve(size, what)
        packed = PackedTables(self, offset, shapes, dtype, what)
        self._used[offset] = (*self._used[offset][:2], packed)
        return packed

    def pack_beyond(self, shapes: dict, dtype: torch.dtype, what: str) -> PackedTables:
        """Tables (zeroed) that do not fit the budget, in memory of their own, counted in `beyond` until they are
        released or taken back."""
        packed = AdapterArena(table_layout(shapes, dtype)[1], self.buffer.device).pack(shapes, dtype, what)
        packed.ledger = self
        self._beyond[id(packed)] = packed
        self.beyond_total += packed.size
        return packed

    def take_back(self, packed: PackedTables) -> None:
        """Move tables placed beyond the budget into it (the caller made room: `fits(packed.size)`); `packed` holds
        the same values at their new address."""
        offset = self.reserve(packed.size, packed.what, packed)
        self.buffer[offset:offset + packed.size].copy_(packed.arena.buffer[packed.offset:packed.offset + packed.size])
        del self._beyond[id(packed)]
        packed.arena, packed.ledger = self, None  # its own arena goes with the last reference to it
        packed.moved(offset)

    def release(self, offset: int) -> None:
        size, _, _ = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, size))
        self._free.insert(i, (offset, size))
        # merge with the following range, then with the preceding one
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            start, before = self._free.pop(i - 1)
            self._free[i - 1] = (start, before + self._free[i - 1][1])

    def compact(self) -> int:
        """Slide every reserved range down to the start, in address order, so the free memory is one range; each
        moved range's owner re-views it. Returns the bytes moved."""
        moved, target, used = 0, 0, {}
        for offset in sorted(self._used):
            size, what, owner = self._used[offset]
            if offset != target:  # ranges only move down: copy through a temporary when source and target overlap
                self.buffer[target:target + size].copy_(self.buffer[offset:offset + size].clone())
                moved += size
                if owner is not None:
                    owner.moved(target)
            used[target] = (size, what, owner)
            target += size
        self._used = used
        self._free = [(target, self.capacity - target)] if target < self.capacity else []
        return moved

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A typed view of `shape` starting at `offset` (inside a range reserved by the caller)."""
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)


def table_layout(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> tuple[dict[str, int], int]:
    """Aligned offsets of several tables packed in one range, and the range's size in bytes."""
    element = torch.empty((), dtype=dtype).element_size()
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += _aligned(_numel(shape) * element)
    return offsets, total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT
