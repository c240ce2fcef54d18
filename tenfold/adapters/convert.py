"""`tenfold convert --to lora`: an exactly-low-rank adapter written as a standard PEFT LoRA directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Adapter
from .lora import format as lora_format


def convert_to_lora(adapter: Adapter, out_dir, base_model: str | None = None) -> Path:
    """Write the exact LoRA form; raises NoExactLoRAError (bat, loretta_adp) before touching the filesystem.
    Refuses to write into a non-empty directory."""
    adapter.require_spec("conversion to LoRA")
    with torch.no_grad():
        factors = {key: adapter.lora_factors(key) for key in adapter.targets}
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; refusing to overwrite it")
    return lora_format.write(factors, out, base_model)
