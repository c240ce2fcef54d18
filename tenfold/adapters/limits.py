"""What one adapter may cost before anything is allocated for it: the size of its files, of its config and of the
tensor-file header, the rank an engine serves (--max-lora-rank) and the size of what is densified from it (TT cores
contracted, blocks tiled, LoRTA's per-layer LoRA form). Each is checked from the config and the files' headers,
before the work it bounds starts."""

from __future__ import annotations

import os

from .errors import AdapterTooLargeError, where

DEFAULT_MAX_BYTES = 4 << 30
MAX_CONFIG_BYTES = 1 << 20      # adapter_config.json: real ones are a few KB
MAX_CONFIG_DEPTH = 32           # nesting of adapter_config.json (real ones: 3 or 4)
MAX_HEADER_BYTES = 8 << 20      # a safetensors header (JSON): ~150 bytes a tensor, so ~50k tensors
MAX_TENSORS = 100_000           # tensors in one file (an 80-layer LoRETTA of every module: ~10k)
MAX_TENSOR_NAME = 256           # characters in one tensor name (PEFT's longest: ~120)
MAX_TENSOR_DIMS = 8             # dimensions of one tensor (tenfold's families use 1 to 3)


def max_adapter_bytes() -> int:
    """The size limit for one adapter's tensor file: env TENFOLD_MAX_ADAPTER_BYTES, default 4 GiB."""
    value = os.environ.get("TENFOLD_MAX_ADAPTER_BYTES")
    return int(value) if value else DEFAULT_MAX_BYTES


def require_rank(ranks: dict[str, int], max_rank: int | None, family: str, cfg_path) -> None:
    """Every rank that sizes a serving table or a contraction ({config key: value}) within the engine's
    --max-lora-rank."""
    if max_rank is None:
        return
    for key, value in ranks.items():
        if value > max_rank:
            raise AdapterTooLargeError(
                f"{where(cfg_path, key)}: this {family} adapter needs rank {value}, above the engine's "
                f"--max-lora-rank {max_rank}; start the engine with --max-lora-rank {value} or more")


def require_dense_size(entries: int, element_size: int, what: str, source, max_bytes: int | None = None) -> None:
    """What a family densifies (`entries` values of `element_size` bytes) is held to the adapter size limit: a
    file of that size would have been refused."""
    limit = max_adapter_bytes() if max_bytes is None else max_bytes
    if entries * element_size > limit:
        raise AdapterTooLargeError(
            f"{where(source)}: {what} would take {entries} values ({entries * element_size} bytes), over the adapter "
            f"size limit of {limit} bytes (TENFOLD_MAX_ADAPTER_BYTES); refused before computing it")
