"""Official LoRETTA adp checkpoints: peft_type BOTTLENECK with tensorized=true, keys
``...<module>.adapter_down.layer.tensor.factors.<k>``, ``...adapter_down.layer.bias`` (likewise adapter_up) and, with
learned scaling, ``...<module>.adapter_scaling``."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import group_by_module
from ..errors import AdapterFormatError, AdapterMismatchError, where
from ..settings import TARGET_REGEX, Refusal, audit, not_set, template_from_paths
from ..values import Values

# The official LorettaAdpConfig (yifanycc/loretta, loretta/tuners/loretta_adp.py) and PEFT's base config keys.
HONOURED = ("bottleneck_size", "non_linearity", "adapter_dropout", "target_modules", "scaling", "init_weights",
            "tensorized", "tensor_rank", "use_parallel_adapter", "use_adapterp")
REFUSED = (
    Refusal("bias", "'none'", lambda v: v in (None, "none"), "bias training changes the base model's biases, which "
            "tenfold does not serve"),
    Refusal("modules_to_save", "null or []", not_set, "whole modules saved beside the adapter are not served"),
)
from .family import LoRETTAAdp, check_activation, check_scaling


def check(config: dict, cfg_path: Path) -> dict[str, int]:
    """Every setting audited and every value the official LoRETTA adp code reads checked; {key: rank}:
    bottleneck_size sizes the contracted down and up projections, tensor_rank the contraction itself."""
    audit(config, cfg_path, HONOURED, REFUSED, "LoRETTA adp")
    values = Values(config, cfg_path)
    if not values.flag("tensorized"):
        raise AdapterFormatError(f"{where(cfg_path, 'tensorized')}: expected true (a LoRETTA adp checkpoint); plain "
                                 f"bottleneck adapters are not supported")
    for key in ("use_parallel_adapter", "use_adapterp"):
        if values.flag(key):
            raise AdapterFormatError(f"{where(cfg_path, key)}: parallel adapters are not supported; LoRETTA adp "
                                     f"places pre-adapters on gate/up and a post-adapter on down")
    ranks = {"bottleneck_size": values.int("bottleneck_size"), "tensor_rank": values.int("tensor_rank")}
    check_scaling(values)
    check_activation(values)
    values.fraction("adapter_dropout")
    values.text("init_weights")
    values.targets("target_modules", TARGET_REGEX)
    return ranks


def read(config: dict, tensors: dict, source: Path) -> LoRETTAAdp:
    """A LoRETTA adp adapter from a config `check` accepted and its tensors."""
    scaling = config.get("scaling", 1.0)
    paths: dict = {}
    grouped = group_by_module(
        tensors, r"adapter_(?:down|up)\.layer\.tensor\.factors\.\d+|adapter_(?:down|up)\.layer\.bias|adapter_scaling", source,
        paths)
    template, blocks = template_from_paths(paths)
    ours = {}
    for key, parts in grouped.items():
        for rest, value in parts.items():
            if rest == "adapter_scaling":
                if value.numel() != 1:
                    raise AdapterMismatchError(f"{where(source, paths[key] + '.adapter_scaling')}: expected one "
                                               f"value (the module's learned scaling), found shape {list(value.shape)}")
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
