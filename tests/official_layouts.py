"""Write checkpoints in each third-party layout from the documented key names (independent of tenfold's readers
and writers), so the tests can check that every official layout loads to the same math."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model.model.layers"


def module_path(layer: int, module: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"{PREFIX}.{layer}.{block}.{module}"


def _write(directory: Path, config: dict, tensors: dict, pickle: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    if pickle:
        torch.save(tensors, directory / "adapter_model.bin")
    else:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


# Every key of the fork's LorTaConfig (ihounie/peft, branch lorta, tuners/lorta/config.py) at its default, as the
# fork's save_pretrained writes it.
LORTA_FORK_DEFAULTS = {
    "peft_type": "LORTA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
    "inference_mode": True, "init_scale": 0.0, "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
    "use_rslora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
    "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None,
    "megatron_core": "megatron.core", "loftq_config": {}, "use_dora": False, "layer_replication": None,
}


def lorta_fork(adapter, directory: Path, record_orientation: bool = False, **settings) -> Path:
    """The LoRTA PEFT fork: model-global factors registered on the HF model, saved as base_model.model.lora_*;
    `settings` are further adapter_config.json keys (the fork's documented names)."""
    config = {**LORTA_FORK_DEFAULTS, "r": adapter.config["r"], "lora_alpha": adapter.config["lora_alpha"],
              "target_modules": adapter.config["target_modules"], **settings}
    if record_orientation:
        config["orientation"] = adapter.config["orientation"]
    names = ("lora_A", "lora_B", "lora_C_l", "lora_C_h", "lora_C_m")
    return _write(directory, config, {f"base_model.model.{n}": adapter.tensor(n) for n in names})


def loretta_rep(adapter, directory: Path, **settings) -> Path:
    """Official LoRETTA rep: peft_type LORA + tensor_rank; pickled TT cores under ...lora_A.layer.tensor.factors.k."""
    tensors = {}
    for layer, module in adapter.targets:
        for part in ("lora_A", "lora_B"):
            for k, core in enumerate(adapter.cores((layer, module), part)):
                tensors[f"{module_path(layer, module)}.{part}.layer.tensor.factors.{k}"] = core
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.config["r"],
              "lora_alpha": adapter.config["lora_alpha"], "tensor_rank": adapter.config["tensor_rank"],
              "target_modules": adapter.config["target_modules"], "lora_dropout": 0.0,
              # the rest of the official LorettaRepConfig, at its defaults
              "merge_weights": False, "fan_in_fan_out": False, "enable_lora": None, "bias": "none",
              "modules_to_save": None, "base_model_name_or_path": None, "inference_mode": True, **settings}
    return _write(directory, config, tensors, pickle=True)


def loretta_adp(adapter, directory: Path, learned_scaling: float | None = None, **settings) -> Path:
    """Official LoRETTA adp: peft_type BOTTLENECK, tensorized; down/up TT cores and biases, optional learned
    per-module scaling."""
    tensors = {}
    for key in adapter.targets:
        path = module_path(*key)
        name = f"layers.{key[0]}.{key[1]}"
        for part in ("adapter_down", "adapter_up"):
            k = 0
            while adapter.has_tensor(f"{name}.{part}.cores.{k}"):
                tensors[f"{path}.{part}.layer.tensor.factors.{k}"] = adapter.tensor(f"{name}.{part}.cores.{k}")
                k += 1
            tensors[f"{path}.{part}.layer.bias"] = adapter.tensor(f"{name}.{part}.bias")
        if learned_scaling is not None:
            tensors[f"{path}.adapter_scaling"] = torch.tensor([learned_scaling])
    config = {"peft_type": "BOTTLENECK", "bottleneck_size": adapter.config["bottleneck_size"],
              "non_linearity": adapter.config["non_linearity"], "tensorized": True,
              "tensor_rank": adapter.config["tensor_rank"], "target_modules": adapter.config["target_modules"],
              "scaling": "learned" if learned_scaling is not None else adapter.config["scaling"],
              "use_parallel_adapter": False, "adapter_dropout": 0.0,
              # the rest of the official LorettaAdpConfig, at its defaults
              "use_adapterp": False, "bias": "none", "init_weights": "bert", "modules_to_save": None,
              "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True, **settings}
    return _write(directory, config, tensors, pickle=True)


def peft_dir(directory: Path, config: dict, tensors: dict) -> Path:
    """Any PEFT-style directory from a config and PEFT-named tensors."""
    return _write(directory, config, tensors)


def bone_legacy(adapter, directory: Path, **settings) -> Path:
    """Legacy PEFT Bone: peft_type BONE, bone_block tensors, init_weights true or "bat"."""
    tensors = {f"{module_path(*k)}.bone_block": adapter.block(k) for k in adapter.targets}
    config = {"peft_type": "BONE", "r": adapter.config["r"], "target_modules": adapter.config["target_modules"],
              "init_weights": "bat" if adapter.family == "bat" else True, **settings}
    return _write(directory, config, tensors)
