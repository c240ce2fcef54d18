"""Compatibility path: any tenfold-readable adapter directory -> vLLM LoRA tensors, in memory.

Families with an exact LoRA form (lora, lorta, loretta_rep, miss default/mini) are converted when vLLM loads the
adapter; nothing is written next to the user's files. Conversions are cached per (path, file fingerprint, base
model), so the front-end's validation and the worker's load each pay once per adapter version.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import ModelSpec, NoExactLoRAError, load_adapter
from ..adapters.checkpoint import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from ..adapters.errors import AdapterMismatchError
from ..adapters.lora.format import peft_lora_config, peft_lora_tensors

CACHE_SIZE = 64


@dataclass(frozen=True)
class ConvertedAdapter:
    family: str
    rank: int
    peft_config: dict  # what vLLM's PEFTHelper reads (scaling folded in: lora_alpha == r)
    tensors: dict[str, torch.Tensor]  # PEFT-named lora_A / lora_B weights
    fingerprint: str
    params: int  # the adapter's own parameters (its compact factors)
    nbytes: int  # bytes of the adapter's own factors


def fingerprint(path) -> str:
    """Identity of an adapter version: size, mtime and inode of its config and tensor files. Changes whenever the
    files are rewritten, so prefix-cache keys and worker caches notice a reloaded adapter."""
    directory = Path(path)
    parts = []
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


def convert_for_vllm(path, spec: ModelSpec, max_rank: int | None = None) -> ConvertedAdapter:
    """Load, validate against the served model and convert to LoRA tensors; raises AdapterError subclasses (and
    FileNotFoundError for a missing directory) with messages fit for the user."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    key = (str(directory.resolve()), fingerprint(directory), spec)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            converted = _cache[key]
            _check_rank(converted, directory, max_rank)
            return converted
    adapter = load_adapter(directory, spec)
    if not adapter.has_exact_lora:
        raise NoExactLoRAError(
            f"{directory}: {adapter.family} adapters have no exact LoRA form, so vLLM's LoRA path (tenfold's "
            f"compatibility mode) cannot serve them; they are served by tenfold's native path (native mode)")
    with torch.no_grad():
        factors = {k: adapter.lora_factors(k) for k in adapter.targets}
        rank, tensors = peft_lora_tensors({k: (a.float(), b.float()) for k, (a, b) in factors.items()})
    converted = ConvertedAdapter(adapter.family, rank, peft_lora_config(rank, adapter.target_modules()), tensors,
                                 key[1], adapter.num_params(), adapter.nbytes())
    _check_rank(converted, directory, max_rank)
    with _lock:
        _cache[key] = converted
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return converted


def _check_rank(converted: ConvertedAdapter, directory: Path, max_rank: int | None) -> None:
    if max_rank is not None and converted.rank > max_rank:
        raise AdapterMismatchError(
            f"{directory}: this {converted.family} adapter needs LoRA rank {converted.rank}, above the engine's "
            f"max_lora_rank {max_rank}; start the engine with --max-lora-rank {converted.rank} or more")
