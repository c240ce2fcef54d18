"""PEFT LoRA directories: reading (peft_type LORA) and writing (used by `tenfold convert --to lora`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..base import key_name
from ..checkpoint import CONFIG_NAME, SAFETENSORS_NAME, group_by_module
from ..errors import AdapterFormatError, where
from .family import LoRA

PEFT_PREFIX = "base_model.model."


def _pattern_value(patterns: dict, path: str):
    """PEFT's rank/alpha pattern rule: a pattern matches a module whose path ends with it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def read(config: dict, tensors: dict, source: Path) -> LoRA:
    for flag in ("use_dora",):
        if config.get(flag):
            raise AdapterFormatError(f"{where(source.parent / CONFIG_NAME, flag)}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{where(source.parent / CONFIG_NAME, 'bias')}: expected 'none', found "
                                 f"{config.get('bias')!r}; LoRA bias training changes the base biases and is not served")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)):
            raise AdapterFormatError(f"{where(source.parent / CONFIG_NAME, field)}: expected a number, found "
                                     f"{config.get(field)!r}")
    paths: dict = {}
    grouped = group_by_module(tensors, r"lora_[AB]\.weight", source, paths)
    ours, alphas = {}, {}
    for key, parts in grouped.items():
        for rest, value in parts.items():
            ours[f"{key_name(key)}.{rest.split('.')[0]}"] = value
        alpha = _pattern_value(config.get("alpha_pattern") or {}, paths[key].removeprefix(PEFT_PREFIX))
        if alpha is not None:
            alphas[key_name(key)] = float(alpha)
    targets = config.get("target_modules")
    layers = config.get("layers_to_transform")
    ours_config = {
        "r": config["r"], "lora_alpha": float(config["lora_alpha"]), "use_rslora": bool(config.get("use_rslora")),
        "module_alphas": alphas,
        "target_modules": sorted(targets) if isinstance(targets, list) else sorted({m for _, m in grouped}),
        "layers": [layers] if isinstance(layers, int) else layers,
    }
    if isinstance(targets, str):
        ours_config["target_regex"] = targets  # a regex target: coverage is whatever the regex matched
    return LoRA(ours_config, ours, source=source)


def module_path(key) -> str:
    """The Llama module path of a (layer, module) key, as PEFT writes it."""
    layer, module = key
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"{PEFT_PREFIX}model.layers.{layer}.{block}.{module}"


def peft_lora_tensors(factors: dict) -> tuple[int, dict[str, torch.Tensor]]:
    """{(layer, module): (A [r, in], B [out, r])} (scaling folded into B) -> (r, PEFT-named tensors). All modules get
    one rank r (lower ranks are zero-padded, which is exact), so the adapter is served with lora_alpha == r."""
    r = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for key, (a, b) in sorted(factors.items()):
        pad = r - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        tensors[f"{module_path(key)}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{module_path(key)}.lora_B.weight"] = b.detach().contiguous().cpu()
    return r, tensors


def peft_lora_config(r: int, target_modules, base_model: str | None = None) -> dict:
    """adapter_config.json of a PEFT LoRA whose scaling is 1 (lora_alpha == r)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted(set(target_modules)), "base_model_name_or_path": base_model,
    }


def write(factors: dict, directory: Path, base_model: str | None = None) -> Path:
    """Write {(layer, module): (A, B)} (scaling folded into B) as a PEFT LoRA directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    r, tensors = peft_lora_tensors(factors)
    config = peft_lora_config(r, [m for _, m in factors], base_model)
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
