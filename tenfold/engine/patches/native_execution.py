"""Native execution (patch 8 of `vllm_compat`): tenfold's layer wrappers, slot store and step plan inside vLLM's
LoRA model manager."""

from __future__ import annotations

import logging

import torch

from ...adapters.spec import served_spec
from . import Replacement, replacing


def replacements() -> list[Replacement]:
    import vllm.lora.model_manager as model_manager
    import vllm.lora.utils as lora_utils
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from ..adapter_memory import AdapterMemoryError, budget_from_env, engine_budget, gib, stock_lora_bytes
    from ..loader import cpu_kernel_dtype, native_cpu_dtype
    from ..layers import NATIVE_LAYER_CLASSES, NativeAdapterMixin
    from ..mode import execution_mode
    from ..native_model import NativeLoRAModel
    from ..native_state import NativeState
    from ..sharding import Shard
    from ..slots import SlotStore

    # tenfold's wrappers first: vLLM gives each layer to the first class that claims it
    wrapper_classes = (*NATIVE_LAYER_CLASSES, *(c for c in lora_utils._all_lora_classes
                                                if c not in NATIVE_LAYER_CLASSES))
    original_supported = model_manager.is_supported_lora_module

    def is_supported_lora_module(module_name, module, supported_lora_modules):
        if execution_mode() == "native" and isinstance(module, VocabParallelEmbedding):
            return False  # embed_tokens, lm_head: no tenfold family adapts them
        return original_supported(module_name, module, supported_lora_modules)

    manager = model_manager.LoRAModelManager
    original_create_modules = manager._create_lora_modules

    def _create_lora_modules(self):
        original_create_modules(self)
        if execution_mode() != "native":
            return
        wrappers = {n: m for n, m in self.modules.items() if isinstance(m, NativeAdapterMixin)}
        others = sorted(n for n in self.modules if n not in wrappers)
        if others:
            raise ValueError(f"tenfold native mode cannot adapt {others[:4]}: no tenfold wrapper claimed them; serve "
                             f"this model with TENFOLD_MODE=convert")
        spec = served_spec(self.model.config)
        dtype = native_cpu_dtype(self.lora_config.lora_dtype) if self.device.type == "cpu" else (
            self.lora_config.lora_dtype)
        first = next(iter(wrappers.values()), None)
        try:  # this worker's tensor-parallel part of every layer, as the wrappers hold it
            shard = Shard(spec, first.tp_rank, first.tp_size) if first is not None else Shard(spec)
        except ValueError as e:
            raise ValueError(f"{e}; or serve this model with TENFOLD_MODE=convert") from None
        element = torch.empty((), dtype=dtype).element_size()
        budget = engine_budget(spec, self.lora_slots, self.lora_config.max_lora_rank, element)
        # reserved here, while vLLM loads the model: before it sizes its KV cache from the memory left
        kernel_dtype = cpu_kernel_dtype(self.lora_config.lora_dtype) if self.device.type == "cpu" else None
        if kernel_dtype is not None:
            from ...kernels import cpu

            cpu.ops()  # built (or loaded) now, at start-up, and a failed build stops it with the compiler's message
        store = SlotStore(spec, self.lora_slots, dtype, self.device, shard, memory_bytes=budget,
                          kernel_dtype=kernel_dtype)
        punica = self._get_punica_wrapper(next(iter(wrappers), "")) if wrappers else None
        native = self._tenfold_native = NativeState(store, punica)
        native.make_room = lambda: evict_unneeded(self, native, None)
        native.evict = lambda slot: evict_slot(self, native, slot)
        for name, module in wrappers.items():
            suffix = name.rsplit(".", 1)[-1]
            module.bind_native(self._tenfold_native, name, self.packed_modules_mapping.get(suffix) or [suffix])
        # under vLLM's logger namespace, so it reaches vLLM's start-up log
        logging.getLogger("vllm.tenfold").info(
            "tenfold native mode: %d slots, %d layers wrapped%s; adapter memory %s (%s%s) reserved for every slot "
            "table and frozen-weight copy, %s; each bucket (adapters of one family and shape) takes one row per "
            "slot from it when its first adapter arrives and logs its bytes per slot then (here a LoRA of rank "
            "%d on every linear module takes %d bytes per slot, a LoRTA row 2-2.7x its adapter's parameters)",
            self.lora_slots, len(wrappers), f" on tensor-parallel rank {shard.rank}/{shard.size}" if shard.sharded
            else "", gib(budget), str(dtype).removeprefix("torch."),
            "" if kernel_dtype is None else
            f"; {_kernel_families()} tables in {str(kernel_dtype).removeprefix('torch.')}, applied by tenfold's "
            f"CPU kernels",
            f"--adapter-memory {budget_from_env() / (1 << 30):g}" if budget_from_env() else
            f"the default: twice what vLLM's LoRA reserves for max_loras={self.lora_slots} and "
            f"max_lora_rank={self.lora_config.max_lora_rank}, at least 512 MiB (set --adapter-memory GIB)",
            self.lora_config.max_lora_rank,
            stock_lora_bytes(spec, 1, self.lora_config.max_lora_rank,
                             element if kernel_dtype is None else kernel_dtype.itemsize) // max(1, shard.size))

    def _add_adapter(self, lora):
        if isinstance(lora, NativeLoRAModel):
            self._registered_adapters[lora.id] = lora  # nothing to pack: the factors stay in family form
            return
        original_add(self, lora)

    def activate_adapter(self, lora_id):
        activated = original_activate(self, lora_id)
        native = getattr(self, "_tenfold_native", None)
        if activated and native is not None:
            lora = self._registered_adapters[lora_id]
            if not isinstance(lora, NativeLoRAModel):
                raise TypeError(f"adapter {lora_id} was loaded as LoRA tensors but the engine runs tenfold's native "
                                f"mode")
            try:
                native.store.assign(self.lora_index_to_id.index(lora_id), lora.adapter,
                                    make_room=lambda: evict_unneeded(self, native, lora_id),
                                    in_step=bool(native.step_adapters))
            except AdapterMemoryError:
                self.deactivate_adapter(lora_id)  # no step may map tokens to the empty slot
                raise
        return activated

    def evict_unneeded(self, native, activating: int) -> bool:
        """Deactivate the least recently used adapter that neither the step nor this activation needs (nor a
        pin holds), which frees its row; False when there is none."""
        needed, pinned = native.step_adapters | {activating}, self._active_adapters.pinned_items
        for lora_id in list(self._active_adapters.order):
            if lora_id not in needed and lora_id not in pinned:
                return self.deactivate_adapter(lora_id)
        return False

    def evict_slot(self, native, slot: int) -> bool:
        """Deactivate the adapter in `slot` unless the step being prepared needs it or a pin holds it."""
        lora_id = self.lora_index_to_id[slot]
        if lora_id is None or lora_id in native.step_adapters or lora_id in self._active_adapters.pinned_items:
            return False
        return self.deactivate_adapter(lora_id)

    def _deactivate_adapter(self, lora_id):
        native = getattr(self, "_tenfold_native", None)
        if native is not None and lora_id in self.lora_index_to_id:
            native.store.release(self.lora_index_to_id.index(lora_id))
        original_deactivate(self, lora_id)

    def remove_all_adapters(self):
        original_remove_all(self)
        native = getattr(self, "_tenfold_native", None)
        if native is not None:
            native.store.clear()

    def _set_adapter_mapping(self, mapping):
        original_set_mapping(self, mapping)
        native = getattr(self, "_tenfold_native", None)
        if native is not None:
            native.mapping_changed(len(mapping.index_mapping))

    def create_dummy_lora(self, lora_id, rank, embedding_modules=None):
        if getattr(self, "_tenfold_native", None) is not None:
            return NativeLoRAModel(lora_id, None)
        return original_dummy(self, lora_id, rank, embedding_modules)

    original_add, original_activate = manager._add_adapter, manager.activate_adapter
    original_deactivate, original_remove_all = manager._deactivate_adapter, manager.remove_all_adapters
    original_set_mapping, original_dummy = manager._set_adapter_mapping, manager.create_dummy_lora
    return [
        Replacement(lora_utils, "_all_lora_classes", wrapper_classes),
        Replacement(model_manager, "is_supported_lora_module", is_supported_lora_module),
        *replacing(manager, _create_lora_modules=_create_lora_modules, _add_adapter=_add_adapter,
                   activate_adapter=activate_adapter, _deactivate_adapter=_deactivate_adapter,
                   remove_all_adapters=remove_all_adapters, _set_adapter_mapping=_set_adapter_mapping,
                   create_dummy_lora=create_dummy_lora),
    ]


def _kernel_families() -> str:
    """The families whose tables tenfold's CPU kernels read in the model's dtype, for the start-up log."""
    from ..buckets import BUCKETS

    families = sorted(f for f, bucket in BUCKETS.items() if bucket.has_cpu_kernels)
    return "every family's" if len(families) == len(BUCKETS) else ", ".join(families)
