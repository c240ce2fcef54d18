"""Official LoRETTA rep checkpoints: peft_type LORA plus tensor_rank, pickled adapter_model.bin with keys
``...<module>.lora_A.layer.tensor.factors.<k>`` (and lora_B). The mode sizes live in the cores' shapes."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import CONFIG_NAME, group_by_module
from ..errors import AdapterFormatError, where
from ..settings import Refusal, audit, not_set, template_from_paths

# The official LorettaRepConfig (yifanycc/loretta, loretta/tuners/loretta_rep.py) and PEFT's base config keys.
HONOURED = ("r", "lora_alpha", "tensor_rank", "target_modules", "lora_dropout", "merge_weights")
REFUSED = (
    Refusal("bias", "'none'", lambda v: v in (None, "none"), "bias training changes the base model's biases, which "
            "tenfold does not serve"),
    Refusal("modules_to_save", "null or []", not_set, "whole modules saved beside the adapter are not served"),
    Refusal("fan_in_fan_out", "false", lambda v: not v, "the official code transposes the base weight of an nn.Linear "
            "with fan_in_fan_out, which a Llama model does not hold"),
    Refusal("enable_lora", "null", not_set, "merged (fused-projection) LoRETTA layers are not served"),
)
from .family import LoRETTARep


def read(config: dict, tensors: dict, source: Path) -> LoRETTARep:
    audit(config, source.parent / CONFIG_NAME, HONOURED, REFUSED, "LoRETTA rep")
    for field in ("r", "lora_alpha", "tensor_rank"):
        if not isinstance(config.get(field), (int, float)):
            raise AdapterFormatError(f"{where(source.parent / CONFIG_NAME, field)}: expected a number, found "
                                     f"{config.get(field)!r}")
    paths: dict = {}
    grouped = group_by_module(tensors, r"lora_[AB]\.layer\.tensor\.factors\.\d+", source, paths)
    template, blocks = template_from_paths(paths)
    ours = {}
    for key, parts in grouped.items():
        for rest, value in parts.items():
            part, k = rest.split(".")[0], rest.rsplit(".", 1)[1]
            ours[f"{key_name(key)}.{part}.cores.{k}"] = value
    targets = config.get("target_modules")
    targeting = {"rule": "loretta", "path_template": template, "blocks": blocks, "target_modules": targets}
    return LoRETTARep({"r": config["r"], "lora_alpha": float(config["lora_alpha"]), "tensor_rank": config["tensor_rank"],
                       "target_modules": sorted(targets) if isinstance(targets, list) else sorted({m for _, m in grouped}),
                       "targeting": targeting}, ours, source=source)
