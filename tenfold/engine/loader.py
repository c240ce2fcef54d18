"""Adapter directories -> what the engine serves, in memory: validated family objects (native path) or LoRA
tensors (compatibility path).

Families with an exact LoRA form (lora, lorta, loretta_rep, miss default/mini) can be converted when vLLM loads the
adapter; nothing is written next to the user's files.

Two caches, both keyed by adapter version (a directory and the fingerprint of its files), never by path alone:
- verdicts: for every version checked in this process, what a check answers without reading the files again: the
  light facts of an adapter that passed, or the error of one that was refused (a flood of requests for one bad
  adapter costs one check). Entries are a few hundred bytes; the table holds `VERDICTS` of them.
- loads: the heavy objects a worker registers (factors, LoRA tensors), a few of them: a worker reads each version
  once and then keeps it in vLLM's own adapter cache.
A version snapshot (engine/versions.py) is its own version; `note_snapshot` also files its facts under the version of
the user's directory it copies, so that metrics labels and listings by the user's path find them
(`recorded_facts`) without loading anything.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import Adapter, AdapterError, ModelSpec, NoExactLoRAError, load_adapter
from ..adapters.checkpoint import fingerprint
from ..adapters.errors import AdapterMismatchError
from ..adapters.lora.format import peft_lora_config, peft_lora_tensors

VERDICTS = 1 << 16  # checked versions remembered (facts or refusal): beyond any engine's registered adapters
LOADS = 8  # heavy loads kept (a worker registers each version once, then vLLM's cache holds it)


@dataclass(frozen=True)
class ConvertedAdapter:
    family: str
    rank: int
    peft_config: dict  # what vLLM's PEFTHelper reads (scaling folded in: lora_alpha == r)
    tensors: dict[str, torch.Tensor]  # PEFT-named lora_A / lora_B weights
    fingerprint: str
    params: int  # the adapter's own parameters (its compact factors)
    nbytes: int  # bytes of the adapter's own factors


@dataclass(frozen=True)
class _Refusal:
    """A remembered refusal: raised again, as the same error type with the same message, for the same version."""
    error: type
    message: str

    def raise_again(self):
        raise self.error(self.message)


class _VersionCache:
    """A thread-safe LRU of at most `capacity` values keyed by (kind, directory, fingerprint, ...)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)

    def drop(self, keep) -> None:
        with self.lock:
            for key in [k for k in self.entries if not keep(k)]:
                del self.entries[key]


_verdicts = _VersionCache(VERDICTS)  # (kind, directory, fingerprint, spec, limits) -> light record or _Refusal
_facts = _VersionCache(VERDICTS)  # (kind, directory, fingerprint, spec) -> light record of a version that passed
_loads = _VersionCache(LOADS)  # (kind, directory, fingerprint, spec, limits) -> heavy object
_snapshots: dict[str, tuple[str, str]] = {}  # snapshot directory -> (the user's directory, its fingerprint then)
_snapshots_lock = threading.Lock()


def version_of(path) -> tuple[str, str]:
    """(resolved directory, fingerprint of its files): the version a check of `path` reads now (one stat per file)."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    resolved = directory.resolve()
    return str(resolved), fingerprint(resolved)


def note_snapshot(snapshot, source, source_fingerprint: str) -> None:
    """`snapshot` is an immutable copy of `source` at `source_fingerprint` (engine/versions.py): what a check of the
    snapshot finds is also what `recorded_facts` answers for that version of `source`. Checks of the snapshot still
    read the snapshot's own bytes."""
    with _snapshots_lock:
        _snapshots[str(Path(snapshot).resolve())] = (str(Path(source).resolve()), source_fingerprint)


def _versioned(kind: str, path, spec: ModelSpec, limits: tuple, build, light=None, keep: bool = False):
    """What `build(directory, version)` makes of `path`'s current version, once per version and limits. Without
    `keep`, the light record (`light(built)`) is returned and remembered as the version's verdict; with `keep` the
    built object itself, kept among the last few loads (its light record remembered too, when `light` is given).
    A refusal (an AdapterError) is remembered and raised again for the same version without reading its files."""
    directory, version = version_of(path)
    key = (kind, directory, version, spec, limits)
    if keep and (built := _loads.get(key)) is not None:
        return built
    verdict = _verdicts.get(key)
    if isinstance(verdict, _Refusal):
        verdict.raise_again()
    if verdict is not None and not keep:
        return verdict
    try:
        built = build(Path(directory), version)
    except AdapterError as e:
        _verdicts.put(key, _Refusal(type(e), str(e)))
        raise
    if light is not None:
        record = light(built)
        _verdicts.put(key, record)
        _record_facts(kind, directory, version, spec, record)
    if keep:
        _loads.put(key, built)
        return built
    return record


def _record_facts(kind: str, directory: str, version: str, spec: ModelSpec, record) -> None:
    _facts.put((kind, directory, version, spec), record)
    with _snapshots_lock:
        source = _snapshots.get(directory)
    if source is not None:
        _facts.put((kind, *source, spec), record)


def forget(path) -> None:
    """Drop what is kept of `path`'s versions: an adapter version that will not be read again (a freed snapshot)."""
    directory = str(Path(path).resolve())
    with _snapshots_lock:
        _snapshots.pop(directory, None)
    for cache in (_verdicts, _loads, _facts):
        cache.drop(lambda key: key[1] != directory)


@dataclass(frozen=True)
class NativeCheck:
    """What the front end keeps of a native adapter that passed its checks: its facts, no tensors."""
    family: str
    rank: int
    fingerprint: str
    slot_params: int  # entries of the adapter's row in its native slot tables (of one tensor-parallel rank)
    all_ranks_slot_params: int  # slot_params summed over the tensor-parallel ranks (each shard's row differs)
    frozen_params: int  # entries of the frozen-weight copies its bucket reads (bat, loretta_adp; one rank)
    params: int  # the adapter's own parameters and their bytes: counted once here, not per request's metrics label
    nbytes: int

    def worker_entries(self, tensor_parallel_size: int) -> int:
        """Entries the workers hold for it, all tensor-parallel ranks together (loaded for that size)."""
        return self.all_ranks_slot_params

    def bucket_bytes(self, slots: int, element_size: int) -> int:
        """The adapter memory its bucket reserves at most when it is the first of its kind: one row per slot, plus
        the frozen-weight copies (shared with other buckets that read them)."""
        return (slots * self.slot_params + self.frozen_params) * element_size


@dataclass(frozen=True)
class NativeAdapter(NativeCheck):
    """A native adapter as a worker registers it: the checks' facts and the validated family object."""
    adapter: Adapter = None  # validated against the served model and the tensor-parallel sharding

    def check(self) -> NativeCheck:
        return NativeCheck(**{f: getattr(self, f) for f in NativeCheck.__dataclass_fields__})


def load_for_native(path, spec: ModelSpec, tensor_parallel_size: int = 1, *,
                    max_rank: int | None = None) -> NativeAdapter:
    """Load and validate against the served model (every family) and its tensor-parallel sharding; raises
    AdapterError subclasses (and FileNotFoundError for a missing directory) with messages fit for the user."""
    return _versioned(f"native/tp{tensor_parallel_size}", path, spec, (max_rank,),
                      lambda directory, version: _load_native(directory, version, spec, tensor_parallel_size,
                                                              max_rank),
                      NativeAdapter.check, keep=True)


def check_for_native(path, spec: ModelSpec, tensor_parallel_size: int = 1, *,
                     max_rank: int | None = None) -> NativeCheck:
    """What the front end needs to admit an adapter in native mode (the checks of `load_for_native`), remembered per
    version without its tensors."""
    return _versioned(f"native/tp{tensor_parallel_size}", path, spec, (max_rank,),
                      lambda directory, version: _load_native(directory, version, spec, tensor_parallel_size,
                                                              max_rank),
                      NativeAdapter.check)


def load_for_mode(path, spec: ModelSpec, tensor_parallel_size: int = 1, *, max_rank: int | None = None,
                  budget_slots: int | None = None, tensors: bool = False):
    """Check (or with `tensors`, load) `path` as the current execution path (TENFOLD_MODE) serves it, once per
    version: the one place that chooses between the paths. Native: a `NativeCheck`, or with `tensors` the
    `NativeAdapter` a worker registers; refused when its bucket alone exceeds the adapter memory of an engine of
    `budget_slots` slots (when given). Convert: a `ConvertCheck`, or with `tensors` the `ConvertedAdapter` a worker
    registers; refused above `max_rank`. Raises AdapterError subclasses (and FileNotFoundError for a missing
    directory) with messages fit for the user."""
    if execution_mode_is_native():
        if tensors:
            native = load_for_native(path, spec, tensor_parallel_size, max_rank=max_rank)
        else:
            native = check_for_native(path, spec, tensor_parallel_size, max_rank=max_rank)
        if budget_slots is not None:
            require_fits_budget(path, native, spec, budget_slots, max_rank)
        return native
    if tensors:
        return convert_for_vllm(path, spec, max_rank)
    return check_for_convert(path, spec, max_rank)


def _load_native(directory: Path, version: str, spec: ModelSpec, tensor_parallel_size: int,
                 max_rank: int | None) -> NativeAdapter:
    from .sharding import Shard

    adapter = _read(directory, spec, max_rank)
    # the slot row as a worker would build it (rank 0: every rank's shard has the same widths), which also refuses
    # factors that do not shard
    try:
        shard = Shard(spec, 0, tensor_parallel_size)
    except ValueError as e:
        raise AdapterMismatchError(f"{directory}: {e}") from None
    bucket = _row_bucket(adapter, spec, shard)
    with torch.no_grad():
        slot_params = sum(t.numel() for t in bucket.row_tensors(adapter).values())
    frozen_params = sum(math.prod(shard.weight_shape(module)) for _, module in bucket.frozen_weights())
    other_ranks = sum(_row_params(adapter, spec, tensor_parallel_size, rank) for rank in range(1, tensor_parallel_size))
    return NativeAdapter(family=adapter.family, rank=adapter.rank, fingerprint=version, slot_params=slot_params,
                         all_ranks_slot_params=slot_params + other_ranks, frozen_params=frozen_params,
                         params=adapter.num_params(), nbytes=adapter.nbytes(), adapter=adapter)


def require_fits_budget(path, native: NativeCheck, spec: ModelSpec, slots: int, max_rank: int) -> None:
    """Refuse, before any worker sees it, an adapter whose bucket alone exceeds the engine's adapter memory
    budget (each worker enforces the budget exactly when the adapter takes a slot)."""
    from .adapter_memory import AdapterMemoryError, engine_budget, gib

    element = torch.empty((), dtype=_worker_dtype(spec, native.family)).element_size()
    budget_element = torch.empty((), dtype=_worker_dtype(spec)).element_size()  # as the workers size the budget
    budget, need = engine_budget(spec, slots, max_rank, budget_element), native.bucket_bytes(slots, element)
    if need > budget:
        frozen = f" + {gib(native.frozen_params * element)} of frozen-weight copies" if native.frozen_params else ""
        raise AdapterMemoryError(
            f"{path}: a {native.family} adapter of this shape reserves {gib(need)} of adapter memory "
            f"({slots} slots x {native.slot_params * element} bytes{frozen}), more than the engine's whole budget "
            f"of {gib(budget)}; start the engine with --adapter-memory {need / (1 << 30) * 1.01:.2f} or more (GiB), "
            f"or with fewer --max-loras")


@dataclass(frozen=True)
class AdapterFacts:
    family: str
    rank: int
    params: int        # the adapter's own parameters
    nbytes: int        # bytes of its own factors, as stored
    worker_bytes: int  # bytes the workers hold for it on the current execution path, all tensor-parallel ranks together
    worker_dtype: str = "float32"  # the dtype of what the workers hold
    tensor_parallel_size: int = 1


NATIVE_DTYPE_ENV = "TENFOLD_NATIVE_CPU_DTYPE"  # float32, or model: the served model's dtype


def native_cpu_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of native slot tables and adapter arithmetic on CPU: fp32 (tenfold's default: CPUs without
    AVX512-BF16 emulate bf16 matmuls slowly), or the model's dtype with TENFOLD_NATIVE_CPU_DTYPE=model."""
    import os

    choice = os.environ.get(NATIVE_DTYPE_ENV, "float32")
    if choice not in ("float32", "model"):
        raise ValueError(f"{NATIVE_DTYPE_ENV}={choice!r}: expected float32 or model")
    return model_dtype if choice == "model" else torch.float32


def cpu_kernel_dtype(model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of the slot tables of families with tenfold's CPU kernels (`tenfold.kernels.cpu`): the model's
    (they read bf16 tables in place and accumulate in fp32, so bf16 halves the bytes a step reads); None where the
    kernels are off (TENFOLD_CPU_KERNELS=torch) or do not take the model's dtype (fp16)."""
    from ..kernels import cpu

    return model_dtype if cpu.enabled() and model_dtype in (torch.float32, torch.bfloat16) else None


def _worker_dtype(spec: ModelSpec, family: str | None = None) -> torch.dtype:
    """What the workers store a `family` adapter in: native slot tables on CPU in the model's dtype for families
    with CPU kernels and as `native_cpu_dtype` says for the others (and for `family` None: the dtype the adapter
    memory budget is sized in), and vLLM's LoRA dtype elsewhere, which follows the model's dtype; vLLM's LoRA
    tensors (convert mode) are in the LoRA dtype on every device."""
    from .buckets import BUCKETS

    model_dtype = _model_dtype(spec)
    if execution_mode_is_native() and _on_cpu():
        kernel_dtype = cpu_kernel_dtype(model_dtype)
        if family is not None and kernel_dtype is not None and BUCKETS[family].has_cpu_kernels:
            return kernel_dtype
        return native_cpu_dtype(model_dtype)
    return model_dtype


def _model_dtype(spec: ModelSpec) -> torch.dtype:
    return spec.dtype if spec.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _row_bucket(adapter: Adapter, spec: ModelSpec, shard):
    """A throwaway bucket that builds the adapter's slot row as a worker of `shard` would, in the layout of tenfold's
    CPU kernels where the workers use them (some families keep other tables beside the kernels)."""
    from .buckets import BUCKETS

    cls = BUCKETS[adapter.family]
    kernels = (cls.has_cpu_kernels and execution_mode_is_native() and _on_cpu()
               and cpu_kernel_dtype(_model_dtype(spec)) is not None)
    return cls(cls.signature_of(adapter), spec, torch.float32, torch.device("cpu"), shard, cpu_kernels=kernels)


def execution_mode_is_native() -> bool:
    from .mode import execution_mode

    return execution_mode() == "native"


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # no vLLM: the library alone runs on CPU
        return True


def _row_params(adapter: Adapter, spec: ModelSpec, tensor_parallel_size: int, rank: int) -> int:
    """Entries of the adapter's slot-table row on one tensor-parallel rank (as a worker builds it)."""
    from .sharding import Shard

    bucket = _row_bucket(adapter, spec, Shard(spec, rank, tensor_parallel_size))
    with torch.no_grad():
        return sum(t.numel() for t in bucket.row_tensors(adapter).values())


def adapter_facts(path, spec: ModelSpec, *, tensor_parallel_size: int = 1,
                  worker_dtype: torch.dtype | None = None) -> AdapterFacts:
    """What serving this adapter costs on the current execution path (TENFOLD_MODE): the adapter's own size and the
    bytes its workers hold, in the dtype they hold it in (`worker_dtype`, by default what the engine uses on this
    platform for `spec.dtype`), summed over the `tensor_parallel_size` ranks (each holds its own shard plus the
    parts every rank needs). Built on the request check's verdict (the same key: one read of the files per process
    and file version); checks the adapter first when no check has."""
    return _facts_of(load_for_mode(path, spec, tensor_parallel_size), spec, tensor_parallel_size, worker_dtype)


def recorded_facts(path, spec: ModelSpec, *, tensor_parallel_size: int = 1) -> AdapterFacts | None:
    """The facts of the adapter version now at `path` (one stat of its files) if a check or load in this process
    passed that version or a snapshot of it, else None: never reads or validates an adapter, so metrics labels,
    scrapes and listings cost the same however many adapters are registered."""
    try:
        directory, version = version_of(path)
    except (FileNotFoundError, OSError):
        return None
    kind = f"native/tp{tensor_parallel_size}" if execution_mode_is_native() else "convert-check"
    record = _facts.get((kind, directory, version, spec))
    return None if record is None else _facts_of(record, spec, tensor_parallel_size)


def _facts_of(checked, spec: ModelSpec, tensor_parallel_size: int, worker_dtype: torch.dtype | None = None):
    dtype = worker_dtype or _worker_dtype(spec, checked.family)
    element, name = torch.empty((), dtype=dtype).element_size(), str(dtype).removeprefix("torch.")
    return AdapterFacts(checked.family, checked.rank, checked.params, checked.nbytes,
                        checked.worker_entries(tensor_parallel_size) * element, name, tensor_parallel_size)


def convert_for_vllm(path, spec: ModelSpec, max_rank: int | None = None) -> ConvertedAdapter:
    """Load, validate against the served model and convert to LoRA tensors; raises AdapterError subclasses (and
    FileNotFoundError for a missing directory) with messages fit for the user."""
    converted = _versioned("convert", path, spec, (max_rank,),
                           lambda directory, version: _convert(directory, version, spec, max_rank), keep=True)
    _check_rank(converted, Path(path), max_rank)
    return converted


@dataclass(frozen=True)
class ConvertCheck:
    family: str
    rank: int  # of the exact LoRA form, as the worker will serve it
    fingerprint: str
    params: int  # the adapter's own parameters
    nbytes: int  # bytes of its own factors
    shapes: tuple[tuple[str, int, int], ...]  # (module, in, out) of every module the LoRA form adapts

    def worker_entries(self, tensor_parallel_size: int) -> int:
        """Entries of vLLM's LoRA tensors for it, all tensor-parallel ranks together. vLLM (fully_sharded_loras off,
        its default) keeps lora_A whole on every rank of a column-parallel layer and shards lora_B; a row-parallel
        layer (o_proj, down_proj) the other way round. Every module is served at the adapter's largest rank (lower
        ranks zero-padded)."""
        entries = 0
        for module, fan_in, fan_out in self.shapes:
            a, b = self.rank * fan_in, fan_out * self.rank
            replicated_a = module not in ("o_proj", "down_proj")
            entries += (a * (tensor_parallel_size if replicated_a else 1)
                        + b * (1 if replicated_a else tensor_parallel_size))
        return entries


def check_for_convert(path, spec: ModelSpec, max_rank: int | None = None) -> ConvertCheck:
    """What the front end needs to admit an adapter in convert mode: it loads, fits the served model, has an exact
    LoRA form within `max_rank`. Caches only that (the worker converts; dense LoRA tensors of a LoRTA adapter are
    hundreds of times its file)."""
    checked = _versioned("convert-check", path, spec, (max_rank,),
                         lambda directory, version: _check_convert(directory, version, spec, max_rank), lambda c: c)
    _check_rank(checked, Path(path), max_rank)
    return checked


def _check_convert(directory: Path, version: str, spec: ModelSpec, max_rank: int | None) -> ConvertCheck:
    adapter = _exact_lora_adapter(directory, spec, max_rank)
    rank, shapes = 0, []
    with torch.no_grad():  # one module's factors at a time: nothing dense is kept
        for key in adapter.targets:
            a, b = adapter.lora_factors(key)
            rank = max(rank, a.shape[0])
            shapes.append((key[1], a.shape[1], b.shape[0]))
    return ConvertCheck(adapter.family, rank, version, adapter.num_params(), adapter.nbytes(), tuple(shapes))


def _exact_lora_adapter(directory: Path, spec: ModelSpec, max_rank: int | None) -> Adapter:
    adapter = _read(directory, spec, max_rank)
    if not adapter.has_exact_lora:
        raise NoExactLoRAError(
            f"{directory}: {adapter.family} adapters have no exact LoRA form, so vLLM's LoRA path (tenfold's "
            f"compatibility mode) cannot serve them; they are served by tenfold's native path (native mode)")
    return adapter


def _convert(directory: Path, version: str, spec: ModelSpec, max_rank: int | None) -> ConvertedAdapter:
    adapter = _exact_lora_adapter(directory, spec, max_rank)
    with torch.no_grad():
        factors = {k: adapter.lora_factors(k) for k in adapter.targets}
        rank, tensors = peft_lora_tensors({k: (a.float(), b.float()) for k, (a, b) in factors.items()})
    return ConvertedAdapter(adapter.family, rank, peft_lora_config(rank, adapter.target_modules()), tensors, version,
                            adapter.num_params(), adapter.nbytes())


def _check_rank(converted: ConvertedAdapter | ConvertCheck, directory: Path, max_rank: int | None) -> None:
    if max_rank is not None and converted.rank > max_rank:
        raise AdapterMismatchError(
            f"{directory}: this {converted.family} adapter needs LoRA rank {converted.rank}, above the engine's "
            f"max_lora_rank {max_rank}; start the engine with --max-lora-rank {converted.rank} or more")


def _read(directory: Path, spec: ModelSpec, max_rank: int | None) -> Adapter:
    """The adapter read and validated against the served model; a rank that sizes a table or a contraction above
    `max_rank` (the engine's --max-lora-rank) is refused before any tensor is read."""
    return load_adapter(directory, spec)
