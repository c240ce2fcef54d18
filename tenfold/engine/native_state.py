"""The native path's state for one served model: the slot store and the current step's batch plan.

Created beside vLLM's LoRA model manager in each worker; every tenfold layer wrapper holds it. vLLM's mapping hook
(`_set_adapter_mapping`, where its punica wrapper prepares the step's LoRA metadata, outside the model's forward)
hands over the step's per-token slot indices: they are copied to the host there, once per mapping, and the plan is
built from that copy, so no forward reads a device tensor back. The plan is rebuilt only when the mapping, the slot
contents or the token count changed, so all layers of a step share one grouping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .batch_plan import BucketGroup, plan_batch
from .buckets import Bucket
from .slots import SlotStore


class NativeState:
    def __init__(self, store: SlotStore, punica_wrapper):
        self.store = store
        self.punica_wrapper = punica_wrapper
        self._mapping_version = 0
        self._step_slots = torch.empty(0, dtype=torch.long)  # the step's slot per token (-1: none), on the host
        self._plan_key = None
        self._plan: list[tuple[Bucket, BucketGroup]] = []
        self._layer_plans: dict[tuple, list[tuple[Bucket, BucketGroup]]] = {}
        self.step_adapters: frozenset[int] = frozenset()  # engine ids the step being prepared needs (kept resident)
        # the model manager's evictions, for `settle`: make_room() evicts the least recently used adapter the step
        # does not need; evict(slot) the slot's adapter unless the step needs it (each: whether one went)
        self.make_room: Callable[[], bool] | None = None
        self.evict: Callable[[int], bool] | None = None

    def settle(self) -> None:
        """Before a step's activations (`step_adapters` set): what earlier steps placed beyond the adapter memory
        budget moves back within it, or is given back (`SlotStore.settle`)."""
        self.store.settle(self.make_room, self.evict)

    def mapping_changed(self, num_tokens: int) -> None:
        """vLLM's punica wrapper holds a new token -> slot mapping for `num_tokens` tokens: take the host copy the
        plan is built from, and build the plan."""
        self._mapping_version += 1
        self._step_slots = self.punica_wrapper.token_lora_indices[:num_tokens].to("cpu", torch.long)
        self.plan(num_tokens)

    def plan(self, num_tokens: int) -> list[tuple[Bucket, BucketGroup]]:
        key = (self._mapping_version, self.store.version, num_tokens)
        if key != self._plan_key:
            indices = self._step_slots[:num_tokens]
            if indices.numel() < num_tokens:  # rows beyond the mapping (padding) run the base model
                indices = torch.cat([indices, indices.new_full((num_tokens - indices.numel(),), -1)])
            groups = plan_batch(indices, self.store.bucket_of_slot, self.store.row_of_slot)
            self._plan = [(self.store.buckets[b], g.to(self.store.device)) for b, g in groups]
            self._plan_key = key
            self._layer_plans = {}
        return self._plan

    def layer_plan(self, num_tokens: int, layer: int, modules: tuple[str, ...]) -> list[tuple[Bucket, BucketGroup]]:
        """The part of the step's plan whose buckets adapt this layer's modules (asked by every layer call, so it
        is kept per plan)."""
        plan = self.plan(num_tokens)
        key = (layer, modules)
        found = self._layer_plans.get(key)
        if found is None:
            found = [(b, g) for b, g in plan if any(b.adapts(layer, m) for m in modules)]
            self._layer_plans[key] = found
        return found
