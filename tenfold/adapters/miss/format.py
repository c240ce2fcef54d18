"""PEFT MiSS (peft_type MISS, ``miss_block``) and legacy Bone (peft_type BONE, ``bone_block``) directories.
``init_weights`` decides the variant: true/false -> default, "mini" -> mini (with mini_r), "bat" -> Bat (read by
`bat/format.py` from what `parsed` returns)."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import CONFIG_NAME, group_by_module
from ..errors import AdapterFormatError, where
from ..settings import Refusal, audit, not_set, template_from_paths
from .family import MiSS


HONOURED = ("r", "mini_r", "init_weights", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "miss_dropout", "bone_dropout")
REFUSED = (
    Refusal("bias", "'none'", lambda v: v in (None, "none"), "bias training changes the base model's biases, which "
            "tenfold does not serve"),
    Refusal("modules_to_save", "null or []", not_set, "whole modules saved beside the adapter are not served"),
)


def is_bat(config: dict) -> bool:
    return config.get("init_weights") == "bat"


def parsed(config: dict, tensors: dict, source: Path) -> tuple[dict, dict]:
    """Settings audited; (tenfold's config of the blocks shared by every variant, tensors by tenfold's names)."""
    cfg_path = source.parent / CONFIG_NAME
    audit(config, cfg_path, HONOURED, REFUSED, f"PEFT {config.get('peft_type')}")
    if not isinstance(config.get("r"), int):
        raise AdapterFormatError(f"{where(cfg_path, 'r')}: expected an integer, found {config.get('r')!r}")
    init = config.get("init_weights", True)
    if init not in (True, False, "mini", "bat"):
        raise AdapterFormatError(f"{where(cfg_path, 'init_weights')}: expected true, false, 'mini' or 'bat', found {init!r}")
    block_name = "bone_block" if config.get("peft_type") == "BONE" else "miss_block"
    paths: dict = {}
    grouped = group_by_module(tensors, block_name, source, paths)
    ours = {f"{key_name(key)}.miss_block": parts[block_name] for key, parts in grouped.items()}
    targets = config.get("target_modules")
    template, blocks = template_from_paths(paths)
    common = {"r": config["r"],
              "target_modules": sorted(targets) if isinstance(targets, list) else sorted({m for _, m in grouped}),
              "targeting": {"rule": "peft", "path_template": template, "blocks": blocks,
                            **{k: config.get(k) for k in ("exclude_modules", "layers_to_transform",
                                                          "layers_pattern")},
                            # PEFT's default for every architecture tenfold serves
                            "target_modules": (config["target_modules"] if config.get("target_modules") is not None
                                               else ["q_proj", "v_proj"])}}
    return common, ours


def read(config: dict, tensors: dict, source: Path) -> MiSS:
    cfg_path = source.parent / CONFIG_NAME
    common, ours = parsed(config, tensors, source)
    if config.get("init_weights") == "mini":
        if not isinstance(config.get("mini_r"), int):
            raise AdapterFormatError(f"{where(cfg_path, 'mini_r')}: the mini variant needs an integer mini_r")
        return MiSS({**common, "variant": "mini", "mini_r": config["mini_r"]}, ours, source=source)
    return MiSS({**common, "variant": "default"}, ours, source=source)
