"""Official LoRETTA adp checkpoints: peft_type BOTTLENECK with tensorized=true, keys
``...<module>.adapter_down.layer.tensor.factors.<k>``, ``...adapter_down.layer.bias`` (likewise adapter_up) and, with
learned scaling, ``...<module>.adapter_scaling``."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import CONFIG_NAME, group_by_module
from ..errors import AdapterFormatError, where
from ..settings import Refusal, audit, not_set, template_from_paths

# The official LorettaAdpConfig (yifanycc/loretta, loretta/tuners/loretta_adp.py) and PEFT's base config keys.
HONOURED = ("bottleneck_size", "non_linearity", "adapter_dropout", "target_modules", "scaling", "init_weights",
            "tensorized", "tensor_rank", "use_parallel_adapter", "use_adapterp")
REFUSED = (
    Refusal("bias", "'none'", lambda v: v in (None, "none"), "bias training changes the base model's biases, which "
            "tenfold does not serve"),
    Refusal("modules_to_save", "null or []", not_set, "whole modules saved beside the adapter are not served"),
)
from .family import LoRETTAAdp


def read(config: dict, tensors: dict, source: Path) -> LoRETTAAdp:
    cfg_path = source.parent / CONFIG_NAME
    audit(config, cfg_path, HONOURED, REFUSED, "LoRETTA adp")
    if not config.get("tensorized", False):
        raise AdapterFormatError(f"{where(cfg_path, 'tensorized')}: expected true (a LoRETTA adp checkpoint); plain "
                                 f"bottleneck adapters are not supported")
    if config.get("use_parallel_adapter") or config.get("use_adapterp"):
        raise AdapterFormatError(f"{where(cfg_path, 'use_parallel_adapter')}: parallel adapters are not supported; "
                                 f"LoRETTA adp places pre-adapters on gate/up and a post-adapter on down")
    for field in ("bottleneck_size", "tensor_rank"):
        if not isinstance(config.get(field), int):
            raise AdapterFormatError(f"{where(cfg_path, field)}: expected an integer, found {config.get(field)!r}")
    scaling = config.get("scaling", 1.0)
    if scaling != "learned" and not isinstance(scaling, (int, float)):
        raise AdapterFormatError(f"{where(cfg_path, 'scaling')}: expected a number or 'learned', found {scaling!r}")
    paths: dict = {}
    grouped = group_by_module(
        tensors, r"adapter_(?:down|up)\.layer\.tensor\.factors\.\d+|adapter_(?:down|up)\.layer\.bias|adapter_scaling", source,
        paths)
    template, blocks = template_from_paths(paths)
    ours = {}
    for key, parts in grouped.items():
        for rest, value in parts.items():
            if rest == "adapter_scaling":
                ours[f"{key_name(key)}.adapter_scaling"] = value.reshape(1)
                continue
            part = rest.split(".")[0]
            suffix = "bias" if rest.endswith(".bias") else f"cores.{rest.rsplit('.', 1)[1]}"
            ours[f"{key_name(key)}.{part}.{suffix}"] = value
    targets = config.get("target_modules")
    return LoRETTAAdp({
        "bottleneck_size": config["bottleneck_size"], "tensor_rank": config["tensor_rank"],
        "non_linearity": config.get("non_linearity", "tanh"),
        "scaling": scaling if scaling == "learned" else float(scaling),
        "target_modules": sorted(targets) if isinstance(targets, list) else sorted({m for _, m in grouped}),
        "targeting": {"rule": "loretta", "path_template": template, "blocks": blocks, "target_modules": targets},
    }, ours, source=source)
