"""PEFT MiSS (peft_type MISS, ``miss_block``) and legacy Bone (peft_type BONE, ``bone_block``) directories.
``init_weights`` decides the variant: true/false -> default, "mini" -> mini (with mini_r), "bat" -> Bat (read by
`bat/format.py` from what `parsed` returns)."""

from __future__ import annotations

from pathlib import Path

from ..base import key_name
from ..checkpoint import group_by_module
from ..settings import Refusal, audit, check_peft_targeting, not_set, template_from_paths
from ..values import REQUIRED, Values
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


def check(config: dict, cfg_path: Path) -> dict[str, int]:
    """Every setting audited and every value PEFT's MiSS / Bone (and Bat) reads checked; {key: rank}."""
    audit(config, cfg_path, HONOURED, REFUSED, f"PEFT {config.get('peft_type')}")
    values = Values(config, cfg_path)
    r = values.int("r")
    init = values.choice("init_weights", (True, False, "mini", "bat"), True)
    values.int("mini_r", REQUIRED if init == "mini" else None)  # PEFT writes it (1) for every variant
    values.fraction("miss_dropout")
    values.fraction("bone_dropout")
    check_peft_targeting(values)
    return {"r": r}


def parsed(config: dict, tensors: dict, source: Path) -> tuple[dict, dict]:
    """From a config `check` accepted: (tenfold's config of the blocks shared by every variant, tensors by tenfold's
    names)."""
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
    common, ours = parsed(config, tensors, source)
    if config.get("init_weights") == "mini":
        return MiSS({**common, "variant": "mini", "mini_r": config["mini_r"]}, ours, source=source)
    return MiSS({**common, "variant": "default"}, ours, source=source)
