"""`tenfold convert --to lora`: an exactly-low-rank adapter written as a standard PEFT LoRA directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Adapter
from .errors import NoExactLoRAError
from .lora import format as lora_format


def convert_to_lora(adapter: Adapter, out_dir, base_model: str | None = None) -> Path:
    """Write the exact LoRA form of `adapter` (bound to a base model) to `out_dir` as a PEFT LoRA directory.

    Raises NoExactLoRAError for families with no exact LoRA form (bat, loretta_adp: the family's own message says
    why and that the native path serves it), AdapterMismatchError when no base model is bound, and FileExistsError
    when `out_dir` is a file or a non-empty directory; in all of these cases nothing is written."""
    if not adapter.has_exact_lora:
        adapter.lora_factors(adapter.targets[0])  # raises the family's own explanation
        raise NoExactLoRAError(f"{adapter.family} has no exact LoRA form; tenfold serves it on the native path and "
                               f"refuses a lossy conversion")
    adapter.require_spec("conversion to LoRA")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; refusing to overwrite it")
    with torch.no_grad():
        factors = {key: adapter.lora_factors(key) for key in adapter.targets}
    return lora_format.write(factors, out, base_model)
