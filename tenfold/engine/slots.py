"""The slot store: which adapter each vLLM slot holds, as a row of its bucket's compact tables.

vLLM keeps deciding which adapter goes to which slot (its LRU over `max_loras` slots); tenfold only mirrors each
activation here. Slots of different families and shapes land in different buckets; an empty slot, or one holding a
warm-up dummy, maps to no bucket, and its tokens run the base model unchanged.
"""

from __future__ import annotations

import itertools

import torch

from ..adapters import Adapter, ModelSpec
from .families import BUCKETS, Bucket
from .sharding import Shard


class SlotStore:
    def __init__(self, spec: ModelSpec, num_slots: int, dtype: torch.dtype, device: torch.device,
                 shard: Shard | None = None):
        self.spec, self.num_slots, self.dtype, self.device = spec, num_slots, dtype, device
        self.shard = shard or Shard(spec)  # this worker's tensor-parallel part of every layer
        self.buckets: dict[int, Bucket] = {}
        self._bucket_ids: dict[tuple, int] = {}
        self._next_id = itertools.count()
        self.bucket_of_slot = torch.full((num_slots,), -1, dtype=torch.long)
        self.row_of_slot = torch.zeros(num_slots, dtype=torch.long)
        self.version = 0  # bumped on every change, so cached batch plans know when to rebuild

    def assign(self, slot: int, adapter: Adapter | None) -> None:
        """Put `adapter` (None: a warm-up dummy, i.e. the base model) into `slot`, replacing what it held."""
        # always under inference mode: vLLM activates adapters both inside a step (inference mode: new tables are
        # inference tensors) and from an admin load outside one, where writing into an inference tensor is refused
        with torch.inference_mode():
            self._assign(slot, adapter)

    def _assign(self, slot: int, adapter: Adapter | None) -> None:
        self.release(slot)
        if adapter is None:
            return
        bucket_cls = BUCKETS[adapter.family]
        signature = bucket_cls.signature_of(adapter)
        bucket_id = self._bucket_ids.get(signature)
        if bucket_id is None:
            bucket_id = next(self._next_id)
            self._bucket_ids[signature] = bucket_id
            self.buckets[bucket_id] = bucket_cls(signature, self.spec, self.dtype, self.device, self.shard)
        self.row_of_slot[slot] = self.buckets[bucket_id].allocate(adapter, self.num_slots)
        self.bucket_of_slot[slot] = bucket_id
        self.version += 1

    def release(self, slot: int) -> None:
        bucket_id = int(self.bucket_of_slot[slot])
        if bucket_id < 0:
            return
        bucket = self.buckets[bucket_id]
        bucket.release(int(self.row_of_slot[slot]))
        if bucket.rows_in_use == 0:
            del self.buckets[bucket_id], self._bucket_ids[bucket.signature]
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
