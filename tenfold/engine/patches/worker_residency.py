"""Residency and pins in every worker (patch 10 of `vllm_compat`)."""

from __future__ import annotations

from . import Replacement, replacing


def replacements() -> list[Replacement]:
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager
    from vllm.v1.worker.worker_base import WorkerBase

    from ..residency import PinError, pin_capacity

    def observe(manager) -> None:
        adapters = manager._adapter_manager
        manager._tenfold.ledger.observe(adapters._registered_adapters.cache.keys(),
                                        adapters._active_adapters.cache.keys())

    def pin_resident(manager, engine_ids) -> None:
        # the host cache only (not vLLM's pin_adapter, which also holds a device slot: residency.py says why)
        cache = manager._adapter_manager._registered_adapters
        for engine_id in engine_ids:
            if engine_id in cache:
                cache.pin(engine_id)

    def unpin(manager, engine_ids) -> None:
        cache = manager._adapter_manager._registered_adapters
        for engine_id in engine_ids:
            if engine_id in cache.pinned_items:
                cache._unpin(engine_id)

    patched_add, patched_apply = LRUCacheWorkerLoRAManager.add_adapter, LRUCacheWorkerLoRAManager._apply_adapters
    original_remove = WorkerLoRAManager.remove_adapter

    def add_adapter(self, lora_request):
        book = self._tenfold.ledger
        book.named(lora_request.lora_int_id, lora_request.lora_name)
        loaded = patched_add(self, lora_request)
        if book.pinned_names and lora_request.lora_name in book.pinned_names:
            pin_resident(self, [lora_request.lora_int_id])  # a new version of a pinned name
        if not self._tenfold.in_step:  # a step observes once, after all its adapters
            observe(self)
        return loaded

    def _apply_adapters(self, lora_requests):
        self._tenfold.in_step = True
        try:
            return patched_apply(self, lora_requests)
        finally:
            self._tenfold.in_step = False
            observe(self)

    def remove_adapter(self, adapter_id):
        self._tenfold.ledger.unloading([adapter_id])
        try:
            return original_remove(self, adapter_id)
        finally:
            observe(self)

    def lora_manager(worker):
        manager = getattr(worker.model_runner, "lora_manager", None)
        if manager is None:
            raise RuntimeError("this engine was started without LoRA (--enable-lora): it has no adapter residency")
        return manager

    def tenfold_residency(self) -> dict:
        manager = lora_manager(self)
        observe(manager)
        adapters = manager._adapter_manager
        snapshot = manager._tenfold.ledger.snapshot(adapters.lora_slots, adapters.capacity)
        native = getattr(adapters, "_tenfold_native", None)
        if native is not None:  # the adapter memory budget and what a step placed beyond it (native mode)
            memory = native.store.memory
            snapshot["adapter_memory"] = {"budget": memory.capacity, "used": memory.used, "beyond": memory.beyond,
                                          "beyond_total": memory.beyond_total}
        return snapshot

    def tenfold_pin(self, name: str, pinned: bool) -> dict:
        manager = lora_manager(self)
        book, adapters = manager._tenfold.ledger, manager._adapter_manager
        engine_ids = [i for i, n in book.names.items() if n == name]
        if pinned:
            if name not in book.pinned_names and len(book.pinned_names) >= pin_capacity(adapters.lora_slots,
                                                                                        adapters.capacity):
                raise PinError(f"cannot pin {name!r}: {len(book.pinned_names)} adapters are pinned and the workers' "
                               f"cache holds {adapters.capacity}, of which one step's {adapters.lora_slots} stay free")
            book.pinned_names.add(name)
            pin_resident(manager, engine_ids)
        else:
            book.pinned_names.discard(name)
            unpin(manager, engine_ids)
        return tenfold_residency(self)

    return [
        *replacing(LRUCacheWorkerLoRAManager, add_adapter=add_adapter, _apply_adapters=_apply_adapters),
        Replacement(WorkerLoRAManager, "remove_adapter", remove_adapter),
        Replacement(WorkerBase, "tenfold_residency", tenfold_residency, added=True),
        Replacement(WorkerBase, "tenfold_pin", tenfold_pin, added=True),
    ]
