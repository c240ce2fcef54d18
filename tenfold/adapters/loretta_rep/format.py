"""Official LoRETTA rep checkpoints: peft_type LORA plus tensor_rank, pickled adapter_model.bin with keys
``...<module>.lora_A.layer.tensor.factors.<k>`` (and lora_B). The mode sizes live in the cores' shapes."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import CONFIG_NAME, group_by_module
from ..errors import AdapterFormatError, where
from .family import LoRETTARep


def read(config: dict, tensors: dict, source: Path) -> LoRETTARep:
    for field in ("r", "lora_alpha", "tensor_rank"):
        if not isinstance(config.get(field), (int, float)):
            raise AdapterFormatError(f"{where(source.parent / CONFIG_NAME, field)}: expected a number, found "
                                     f"{config.get(field)!r}")
    grouped = group_by_module(tensors, r"lora_[AB]\.layer\.tensor\.factors\.\d+", source)
    ours = {}
    for key, parts in grouped.items():
        for rest, value in parts.items():
            part, k = rest.split(".")[0], rest.rsplit(".", 1)[1]
            ours[f"{key_name(key)}.{part}.cores.{k}"] = value
    targets = config.get("target_modules")
    return LoRETTARep({"r": config["r"], "lora_alpha": float(config["lora_alpha"]), "tensor_rank": config["tensor_rank"],
                       "target_modules": sorted(targets) if isinstance(targets, list) else sorted({m for _, m in grouped})},
                      ours, source=source)
