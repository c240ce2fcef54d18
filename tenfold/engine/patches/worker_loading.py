"""Worker loading and the worker's adapter cache (patches 1 and 5 of `vllm_compat`)."""

from __future__ import annotations

from ...adapters.spec import served_spec
from . import Replacement, replacing


def replacements() -> list[Replacement]:
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

    from ..loader import NativeAdapter, load_for_mode
    from ..native_model import NativeLoRAModel
    from ..worker_state import WorkerState

    original_init = WorkerLoRAManager.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        self._tenfold = WorkerState(served_spec(vllm_config.model_config.hf_config),
                                    vllm_config.parallel_config.tensor_parallel_size)

    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        try:
            loaded = load_for_mode(path, self._tenfold.spec, self._tenfold.tensor_parallel_size,
                                   max_rank=self.lora_config.max_lora_rank, tensors=True)
        except FileNotFoundError as e:
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from e
        if isinstance(loaded, NativeAdapter):
            return NativeLoRAModel(lora_request.lora_int_id, loaded.adapter)
        converted = loaded
        peft_helper = PEFTHelper.from_dict({**converted.peft_config,
                                            "vllm_max_position_embeddings": self.max_position_embeddings})
        peft_helper.validate_legal(self.lora_config)
        model = self._adapter_manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        lora = self._lora_model_cls.from_lora_tensors(
            lora_model_id=lora_request.lora_int_id, tensors=converted.tensors, peft_helper=peft_helper, device="cpu",
            dtype=self.lora_config.lora_dtype, model_vocab_size=self.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        lora.is_3d_lora_weight = lora_request.is_3d_lora_weight
        return lora

    original_add = LRUCacheWorkerLoRAManager.add_adapter

    def add_adapter(self, lora_request):
        # Runs for every active adapter on every step. Adapter files never change under an engine id (the front end
        # binds each version to an id of its own, versions.py), so a resident adapter is only activated: vLLM's
        # own resident branch copies the whole cache twice per adapter per step (`list_adapters()`).
        lora_id = lora_request.lora_int_id
        if lora_id not in self._adapter_manager._registered_adapters or lora_request.load_inplace:
            return original_add(self, lora_request)
        with gpu_sync_allowed():  # vLLM's already-resident branch: touch it in both LRU caches
            loaded = self._adapter_manager.get_adapter(lora_id) is not None
            self._adapter_manager.activate_adapter(lora_id)
        return loaded

    original_apply = LRUCacheWorkerLoRAManager._apply_adapters

    def _apply_adapters(self, lora_requests):
        # the native slot store may evict active adapters to make room in the adapter memory: never this step's
        native = getattr(self._adapter_manager, "_tenfold_native", None)
        if native is None:
            return original_apply(self, lora_requests)
        native.step_adapters = frozenset(r.lora_int_id for r in lora_requests if r)
        try:
            native.settle()  # what earlier steps placed beyond the adapter memory budget: back within it, or gone
            return original_apply(self, lora_requests)
        finally:
            native.step_adapters = frozenset()

    return [
        *replacing(WorkerLoRAManager, __init__=__init__, _load_adapter=_load_adapter),
        *replacing(LRUCacheWorkerLoRAManager, add_adapter=add_adapter, _apply_adapters=_apply_adapters),
        *_active_adapters_by_id(),
    ]


def _active_adapters_by_id() -> list[Replacement]:
    """vLLM 0.32 collects a step's adapters in a set of LoRARequests, which hash and compare by *name*: two versions
    of one adapter in flight at once (requests admitted before and after a reload) collapse into one, the other
    never gets a slot, and `convert_mapping` raises KeyError in the worker, killing the engine. Keep one request
    per engine id instead."""
    from vllm.v1.worker.gpu.lora_utils import LoraState
    from vllm.v1.worker.gpu_input_batch import InputBatch

    def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):
        req_lora_mapping = self.request_lora_mapping[: self.num_reqs]
        return (tuple(req_lora_mapping.repeat(num_sampled_tokens)),
                tuple(req_lora_mapping.repeat(num_scheduled_tokens)),
                list(self.lora_id_to_lora_request.values()))  # one per id already: the dict is keyed by id

    def get_activate_loras(self, req_ids):
        by_id = {}
        for req_id in req_ids:
            lora_request = self.lora_requests.get(req_id)
            if lora_request is not None:
                by_id[lora_request.lora_int_id] = lora_request
        return list(by_id.values())

    return [
        Replacement(InputBatch, "make_lora_inputs", make_lora_inputs),
        Replacement(LoraState, "get_activate_loras", get_activate_loras),
    ]
