"""Official LoRETTA rep checkpoints: peft_type LORA plus tensor_rank, pickled adapter_model.bin with keys
``...<module>.lora_A.layer.tensor.factors.<k>`` (and lora_B). The mode sizes live in the cores' shapes."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import group_by_module
from ..settings import TARGET_REGEX, Refusal, audit, not_set, template_from_paths
from ..values import Values

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


def check(config: dict, cfg_path: Path) -> dict[str, int]:
    """Every setting audited and every value the official LoRETTA rep code reads checked; {key: rank}: r sizes the
    contracted A and B, tensor_rank the contraction itself."""
    audit(config, cfg_path, HONOURED, REFUSED, "LoRETTA rep")
    values = Values(config, cfg_path)
    ranks = {"r": values.int("r"), "tensor_rank": values.int("tensor_rank")}
    values.number("lora_alpha")
    values.fraction("lora_dropout")
    values.flag("merge_weights")
    values.targets("target_modules", TARGET_REGEX)
    return ranks


def read(config: dict, tensors: dict, source: Path) -> LoRETTARep:
    """A LoRETTA rep adapter from a config `check` accepted and its tensors."""
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
