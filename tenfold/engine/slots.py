"""The slot store: which adapter each vLLM slot holds, as a row of its bucket's compact tables.

vLLM keeps deciding which adapter goes to which slot (its LRU over `max_loras` slots); tenfold only mirrors each
activation here. Slots of different families and shapes land in different buckets; an empty slot, or one holding a
warm-up dummy, maps to no bucket, and its tokens run the base model unchanged. Every table lives in the engine's
adapter memory (`adapter_memory.py`): a bucket reserves one row per slot when it is created and keeps that address;
a bucket left without adapters stays idle, tables kept, until a new bucket needs its memory. Frozen-weight copies
(what bat and loretta_adp read of the base weights) are shared by the buckets that read them and go with the last
one. What a step needed beyond the budget is counted in the arena's ledger (`AdapterArena.beyond`) and given back:
a bucket beyond it as soon as it is idle, everything else at the next step's start (`settle`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from ..adapters import Adapter, ModelSpec
from .adapter_memory import MIN_DEFAULT_BYTES, AdapterArena, AdapterMemoryError, PackedTables, gib, table_layout
from .buckets import BUCKETS, Bucket
from .sharding import Shard

_log = logging.getLogger("vllm.tenfold")  # under vLLM's logger namespace, so it reaches the engine's log


class SlotStore:
    def __init__(self, spec: ModelSpec, num_slots: int, dtype: torch.dtype, device: torch.device,
                 shard: Shard | None = None, memory_bytes: int = MIN_DEFAULT_BYTES,
                 kernel_dtype: torch.dtype | None = None):
        # dtype: the adapter arithmetic's and the frozen-weight copies', and the tables' of families computed with
        # torch ops; kernel_dtype (None: not used): the tables' of families with tenfold's CPU kernels
        self.spec, self.num_slots, self.dtype, self.device = spec, num_slots, dtype, device
        self.kernel_dtype = kernel_dtype
        # frozen-weight copies: with the CPU kernels in their dtype and transposed, W0^T [in, out] (a row per input,
        # contiguous along the outputs, as bat's kernel and a GEMM on the rows of x read it); else W0 [out, in]
        self.frozen_dtype = kernel_dtype or dtype
        self.frozen_transposed = kernel_dtype is not None
        self.shard = shard or Shard(spec)  # this worker's tensor-parallel part of every layer
        self.memory = AdapterArena(memory_bytes, device)  # every table and frozen-weight copy lives in it
        self.buckets: dict[int, Bucket] = {}  # active and idle buckets (idle: no slot uses it, tables kept)
        self._bucket_ids: dict[tuple, int] = {}
        self._idle: list[int] = []  # idle bucket ids, the longest idle first: reclaimed in that order
        self._next_id = itertools.count()
        self._frozen: dict[tuple[int, str], PackedTables] = {}  # (layer, module) -> where its W0 rows are kept
        self._frozen_filled: set[tuple[int, str]] = set()
        self._placing: Bucket | None = None  # a bucket being given its memory: it reads its frozen copies already
        self._beyond_reported = 0  # memory.beyond when `settle` last logged it
        self.bucket_of_slot = torch.full((num_slots,), -1, dtype=torch.long)
        self.row_of_slot = torch.zeros(num_slots, dtype=torch.long)
        self.version = 0  # bumped on every change, so cached batch plans know when to rebuild

    def assign(self, slot: int, adapter: Adapter | None, make_room: Callable[[], bool] | None = None,
               in_step: bool = False) -> None:
        """Put `adapter` (None: a warm-up dummy, i.e. the base model) into `slot`, replacing what it held.

        A new bucket's tables (and any frozen-weight copies it reads) are placed in the adapter memory; while they
        do not fit: idle buckets give theirs back (the longest idle first), the arena compacts if its free memory
        is enough but split, and make_room() (if given: the engine evicts the least recently used adapter the step
        does not need, which releases its slot here) is called until it returns False. What still does not fit
        raises AdapterMemoryError (the slot then holds nothing), except `in_step`: vLLM has already scheduled the
        step's requests, and refusing would stop the engine, so the bucket is placed beyond the budget with a
        warning that says by how much, counted in `memory.beyond` until it is given back (`settle`)."""
        # always under inference mode: vLLM activates adapters both inside a step (inference mode: new tables are
        # inference tensors) and from an admin load outside one, where writing into an inference tensor is refused
        with torch.inference_mode():
            self._assign(slot, adapter, make_room, in_step)

    def _assign(self, slot: int, adapter: Adapter | None, make_room, in_step: bool) -> None:
        self.release(slot)
        if adapter is None:
            return
        bucket_cls = BUCKETS[adapter.family]
        signature = bucket_cls.signature_of(adapter)
        bucket_id = self._bucket_ids.get(signature)
        kernels = self.kernel_dtype is not None and bucket_cls.has_cpu_kernels
        bucket = self.buckets[bucket_id] if bucket_id is not None else bucket_cls(
            signature, self.spec, self.kernel_dtype if kernels else self.dtype, self.device, self.shard, kernels)
        values = bucket.row_values(adapter)
        what = f"the {adapter.family} adapter" + (f" from {adapter.source}" if adapter.source else "")
        self._placing = bucket
        try:
            missing = self._missing_frozen(bucket)
            if missing:
                self._place_frozen(missing, f"frozen-weight copies of {len(missing)} modules for {what}", bucket_id,
                                   make_room, in_step)
            if bucket.packed is None:
                shapes = bucket.table_shapes(values, self.num_slots)
                row_bytes = sum(v.numel() * v.element_size() for v in values.values())
                bucket.take_tables(self._place(shapes, bucket.dtype, f"the tables of {what} ({self.num_slots} slots x "
                                                                     f"{row_bytes} bytes)", bucket_id, make_room, in_step))
                _log.info("tenfold: a %s bucket takes %s of adapter memory (%d slots x %d bytes per slot); %s of %s "
                          "in use", bucket.family, gib(bucket.packed.size), self.num_slots, row_bytes,
                          gib(self.memory.used), gib(self.memory.capacity))
        except AdapterMemoryError as e:
            self._placing = None
            if bucket_id is not None and bucket.rows_in_use == 0 and bucket_id not in self._idle:
                self._idle.append(bucket_id)
            self._free_unread_frozen()  # copies placed for a new bucket that did not get its tables
            raise AdapterMemoryError(f"{what} cannot take a slot: {e}") from None
        finally:
            self._placing = None
        row = bucket.allocate(values)
        if bucket_id in self._idle:
            self._idle.remove(bucket_id)
        if bucket_id is None:
            bucket_id = next(self._next_id)
            self._bucket_ids[signature] = bucket_id
            self.buckets[bucket_id] = bucket
        self.row_of_slot[slot] = row
        self.bucket_of_slot[slot] = bucket_id
        self.version += 1

    def _place(self, shapes: dict, dtype: torch.dtype, what: str, keep: int | None, make_room,
               in_step: bool) -> PackedTables:
        """Tables of `shapes` and `dtype` in the adapter memory, making room as `assign` says."""
        size = table_layout(shapes, dtype)[1]
        held = self._frozen_bytes_read_by(self._placing)
        if size > self.memory.capacity - held and not in_step:  # no eviction could make room
            raise AdapterMemoryError(
                f"{what} need {gib(size)} of adapter memory, more than the budget of {gib(self.memory.capacity)} "
                f"leaves beside the frozen-weight copies they read ({gib(held)}); start the engine with a larger "
                f"--adapter-memory (GiB), or fewer --max-loras (every bucket reserves one row per slot)")
        if not self._make_room(size, what, keep, make_room) and in_step:
            packed = self.memory.pack_beyond(shapes, dtype, what)
            _log.warning("tenfold: %s do not fit the adapter memory budget of %s beside the step's other adapters "
                         "(%s in use); placed beyond it (now %s beyond) until the step's requests are done with "
                         "them. Raise --adapter-memory or lower --max-loras", what, gib(self.memory.capacity),
                         gib(self.memory.used), gib(self.memory.beyond))
            return packed
        return self.memory.pack(shapes, dtype, what)  # raises AdapterMemoryError with the numbers if no room

    def _make_room(self, size: int, what: str, keep: int | None, make_room) -> bool:
        """Whether `size` bytes fit the budget, after idle buckets other than `keep` gave their memory back (the
        longest idle first), the arena compacted, and make_room() (if given) evicted what it could."""
        while not self.memory.fits(size):
            idle = [b for b in self._idle if b != keep]
            if idle:
                self._drop_bucket(idle[0])
            elif self.memory.free >= size:
                _log.info("tenfold: adapter memory compacted (%s moved) to place %s", gib(self.memory.compact()), what)
                self.version += 1  # tables moved: no cached view of them may survive
            elif make_room is None or not make_room():
                return False
        return True

    def settle(self, make_room: Callable[[], bool] | None = None, evict: Callable[[int], bool] | None = None
               ) -> None:
        """Give back what earlier steps placed beyond the budget (the engine calls this before each step's
        activations). Each placement moves into the budget if it fits after idle buckets gave their memory back
        and the arena compacted; else a bucket gives back its slots through evict(slot) (the engine deactivates
        the slot's adapter unless the coming step needs it or it is pinned; True if it did), its last row dropping
        it; else make_room() evicts adapters the coming step does not need until the placement fits. What the
        coming step still needs stays beyond the budget, in `memory.beyond`."""
        if not self.memory.beyond:
            return
        with torch.inference_mode():
            for bucket_id, bucket in list(self.buckets.items()):
                if not bucket.packed.beyond_budget or self._take_back(bucket.packed, bucket_id, None):
                    continue
                if evict is not None:
                    for slot in (self.bucket_of_slot == bucket_id).nonzero().flatten().tolist():
                        evict(slot)  # the bucket's last row released drops it
                if bucket_id in self.buckets:
                    self._take_back(bucket.packed, bucket_id, make_room)
            frozen = {id(p): p for p in self._frozen.values() if p.beyond_budget}
            for packed in frozen.values():
                if not packed.released:  # (a bucket dropped above may have taken it along)
                    self._take_back(packed, None, make_room)
        if self.memory.beyond and self.memory.beyond != self._beyond_reported:  # once per change, not every step
            _log.warning("tenfold: %s of adapter memory stay beyond the budget of %s for the coming step's adapters: "
                         "%s", gib(self.memory.beyond), gib(self.memory.capacity),
                         "; ".join(p.what for p in self.memory.beyond_tables()))
        self._beyond_reported = self.memory.beyond

    def _take_back(self, packed: PackedTables, keep: int | None, make_room) -> bool:
        """Move tables placed beyond the budget into it where room can be made; whether they are gone from beyond
        it (moved, or released meanwhile: make_room may have dropped their bucket)."""
        fits = self._make_room(packed.size, packed.what, keep, make_room)
        if packed.released:
            return True
        if not fits:
            return False
        self.memory.take_back(packed)
        self.version += 1  # the tables moved
        _log.info("tenfold: %s, placed beyond the adapter memory budget for a step, moved within it", packed.what)
        return True

    def _drop_bucket(self, bucket_id: int) -> None:
        bucket = self.buckets.pop(bucket_id)
        del self._bucket_ids[bucket.signature]
        self._idle.remove(bucket_id)
        bucket.free_tables()
        self._free_unread_frozen()

    def _frozen_read(self) -> set[tuple[int, str]]:
        """The (layer, module) pairs whose frozen-weight copy some bucket (active, idle or being placed) reads."""
        buckets = [*self.buckets.values(), *([self._placing] if self._placing is not None else [])]
        return set().union(*(b.frozen_weights() for b in buckets))

    def _frozen_bytes_read_by(self, bucket: Bucket | None) -> int:
        """The bytes of frozen-weight copies within the budget that `bucket` reads (they cannot make room for it)."""
        if bucket is None:
            return 0
        read = bucket.frozen_weights()
        packs = {id(p): p for key, p in self._frozen.items() if key in read and not p.beyond_budget}
        return sum(p.size for p in packs.values())

    def _free_unread_frozen(self) -> None:
        """Give back the frozen-weight copies no bucket reads (each placement goes when none of its modules is read)."""
        read = self._frozen_read()
        packs: dict[int, tuple[PackedTables, list]] = {}
        for key, packed in self._frozen.items():
            packs.setdefault(id(packed), (packed, []))[1].append(key)
        for packed, keys in packs.values():
            if not read.intersection(keys):
                packed.release()
                for key in keys:
                    del self._frozen[key]
                    self._frozen_filled.discard(key)

    def _missing_frozen(self, bucket: Bucket) -> dict[tuple[int, str], tuple[int, int]]:
        """The frozen-weight copies the bucket reads that are not reserved yet, with their shapes."""
        missing = sorted(bucket.frozen_weights() - self._frozen.keys())
        shapes = {key: self.shard.weight_shape(key[1]) for key in missing}
        return {key: shape[::-1] for key, shape in shapes.items()} if self.frozen_transposed else shapes

    def _place_frozen(self, missing: dict, what: str, keep: int | None, make_room, in_step: bool) -> None:
        """Place `missing` frozen-weight copies, kept while a bucket reads them (the same W0 rows serve every
        adapter that reads them)."""
        packed = self._place(missing, self.frozen_dtype, what, keep, make_room, in_step)
        for key in missing:
            self._frozen[key] = packed
        _log.info("tenfold: %s of adapter memory holds %s", gib(packed.size), what)

    def frozen_weight(self, layer: int, module: str, read) -> torch.Tensor:
        """The reserved copy of (layer, module)'s frozen weight rows [out, in] (a transposed view where the copy is
        W0^T, `frozen_transposed`), filled by read() -> [out, in] on first use."""
        key = (layer, module)
        packed = self._frozen.get(key)
        if packed is None:
            raise RuntimeError(f"tenfold: no frozen-weight copy was reserved for layer {layer} {module}")
        copy = packed.views[key].t() if self.frozen_transposed else packed.views[key]
        if key not in self._frozen_filled:
            copy.copy_(read())
            self._frozen_filled.add(key)
        return copy

    def release(self, slot: int) -> None:
        """Empty `slot`; its row is cleared (`Bucket.release`). Under inference mode, like `assign`: vLLM releases
        slots both inside a step and from an admin unload outside one."""
        with torch.inference_mode():
            self._release(slot)

    def _release(self, slot: int) -> None:
        bucket_id = int(self.bucket_of_slot[slot])
        if bucket_id < 0:
            return
        bucket = self.buckets[bucket_id]
        bucket.release(int(self.row_of_slot[slot]))
        if bucket.rows_in_use == 0:
            self._idle.append(bucket_id)
            if bucket.packed.beyond_budget:  # placed beyond the budget for a step: given back at once
                self._drop_bucket(bucket_id)
        self.bucket_of_slot[slot] = -1
        self.version += 1

    def clear(self) -> None:
        for slot in range(self.num_slots):
            self.release(slot)

    def table_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.buckets.values() for t in b.tables.values())

    def index_bytes_per_slot(self) -> int:
        """What an empty slot costs: its two entries in the slot -> (bucket, row) maps."""
        return self.bucket_of_slot.element_size() + self.row_of_slot.element_size()
