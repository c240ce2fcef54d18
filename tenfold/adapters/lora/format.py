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
from ..settings import Refusal, audit, check_peft_targeting, not_set, template_from_paths
from ..values import Values, finite_number, positive_int
from .family import LoRA

PEFT_PREFIX = "base_model.model."


PATTERN_REGEX = r"(.*\.)?({})$"  # how PEFT matches a rank_pattern / alpha_pattern key against a module path


def _pattern_value(patterns: dict, path: str):
    """PEFT's rank/alpha pattern rule: the first pattern that matches the module path's end (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(PATTERN_REGEX.replace("{}", pattern), path):
            return value
    return None


# init_lora_weights values whose initialisation rewrites the base weights (W0 - B0 A0, or a quantized W0): the
# trained A, B only mean something on that changed base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_CONVERT = ("save it converted to plain LoRA: peft_model.save_pretrained(out_dir, "
            "path_initial_model_for_weight_conversion=<dir of the adapter saved right after initialisation>) "
            "(PEFT's PiSSA/OLoRA/CorDA/LoRA-GA conversion; the converted config says init_lora_weights: true); "
            "LoftQ adapters are only correct on their LoftQ-quantized base and are not served")


def _init_served(value) -> bool:
    if isinstance(value, bool):
        return True
    text = str(value).lower()
    return text in ("gaussian", "eva", "orthogonal", "mica") and not text.startswith(_BASE_CHANGING_INITS)


HONOURED = ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
            "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights", "fan_in_fan_out",
            "eva_config", "velora_config", "megatron_config", "megatron_core", "runtime_config", "qalora_group_size",
            "ensure_weight_tying", "loftq_config", "corda_config", "lora_ga_config")
REFUSED = (
    Refusal("use_dora", "false", lambda v: not v, "DoRA rescales each output column by a learned magnitude; tenfold "
            "does not serve it (merge it into the base model instead)"),
    Refusal("bias", "'none'", lambda v: v in (None, "none"), "LoRA bias training changes the base model's biases, "
            "which tenfold does not serve"),
    Refusal("lora_bias", "false", lambda v: not v, "a bias on lora_B is not served"),
    Refusal("modules_to_save", "null or []", not_set, "whole modules trained and saved beside the adapter (their "
            "weights replace the base model's) are not served"),
    Refusal("layer_replication", "null", not_set, "layer replication builds a different layer stack than the served "
            "model's"),
    Refusal("target_parameters", "null", not_set, "LoRA on raw parameters (MoE experts) is not served"),
    Refusal("trainable_token_indices", "null", not_set, "trained embedding rows are not served"),
    Refusal("alora_invocation_tokens", "null", not_set, "aLoRA applies the adapter only from its invocation tokens on; "
            "tenfold would apply it to every token"),
    Refusal("use_qalora", "false", lambda v: not v, "QA-LoRA pools the input before lora_A"),
    Refusal("monteclora_config", "null", not_set, "MonteCLoRA samples its factors"),
    Refusal("use_bdlora", "null", not_set, "BD-LoRA stores block-diagonal factors"),
    Refusal("arrow_config", "null", not_set, "Arrow routes among several LoRA experts per token"),
    Refusal("kasa_config", "null", not_set, "KaSA truncates the base weights' singular values and adds a learned "
            "diagonal"),
    Refusal("init_lora_weights", "true, false, 'gaussian', 'eva', 'orthogonal' or 'mica' (inits that leave the base "
            "weights untouched)", _init_served, "this initialisation changes the base weights, so the adapter is only "
            "correct on that changed base; " + _CONVERT),
)


def check(config: dict, cfg_path: Path) -> dict[str, int]:
    """Every setting audited and every value PEFT's LoRA reads checked; {key: rank} of the ranks its tables take."""
    audit(config, cfg_path, HONOURED, REFUSED, "PEFT LoRA")
    values = Values(config, cfg_path)
    ranks = {"r": values.int("r")}
    values.number("lora_alpha")
    values.fraction("lora_dropout")
    values.flag("use_rslora")
    values.flag("fan_in_fan_out")
    for pattern, rank in values.patterns("rank_pattern", PATTERN_REGEX, positive_int).items():
        ranks[f"rank_pattern.{pattern}"] = rank
    values.patterns("alpha_pattern", PATTERN_REGEX, finite_number)
    check_peft_targeting(values)
    if config.get("layers_to_transform") is not None and config.get("layers_pattern") not in (None, "", [], "layers") \
            and "layers" not in (config.get("layers_pattern") or []):
        raise AdapterFormatError(f"{where(cfg_path, 'layers_pattern')}: expected 'layers' (the decoder's layer list), "
                                 f"found {config['layers_pattern']!r}; with any other pattern PEFT adapts no layer "
                                 f"of a Llama-style model")
    return ranks


def read(config: dict, tensors: dict, source: Path) -> LoRA:
    """A LoRA from a config `check` accepted and its tensors."""
    paths: dict = {}
    grouped = group_by_module(tensors, r"lora_[AB]\.weight", source, paths)
    ours, alphas = {}, {}
    for key, parts in grouped.items():
        for rest, value in parts.items():
            ours[f"{key_name(key)}.{rest.split('.')[0]}"] = value
        path = paths[key].removeprefix(PEFT_PREFIX)
        r = _pattern_value(config.get("rank_pattern") or {}, path)
        r = config["r"] if r is None else r
        a = parts.get("lora_A.weight")
        if a is not None and a.dim() == 2 and a.shape[0] != r:
            raise AdapterFormatError(
                f"{where(source, paths[key] + '.lora_A.weight')}: expected rank {r} (r / rank_pattern of "
                f"{CONFIG_NAME}), found a tensor of rank {a.shape[0]}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
        if alpha is not None:
            alphas[key_name(key)] = float(alpha)
    template, blocks = template_from_paths(paths, PEFT_PREFIX)
    targeting = {"rule": "peft", "path_template": template, "blocks": blocks,
                 **{k: config.get(k) for k in ("exclude_modules", "layers_to_transform",
                                               "layers_pattern")},
                 # PEFT fills a missing target_modules with its default for the architecture: q_proj and v_proj for
                 # every one tenfold serves (llama, mistral, qwen2, qwen3)
                 "target_modules": (config["target_modules"] if config.get("target_modules") is not None
                                    else ["q_proj", "v_proj"])}
    targets = config.get("target_modules")
    ours_config = {
        "r": config["r"], "lora_alpha": float(config["lora_alpha"]), "use_rslora": bool(config.get("use_rslora")),
        "module_alphas": alphas,
        "target_modules": sorted(targets) if isinstance(targets, list) else sorted({m for _, m in grouped}),
        "targeting": targeting,
    }
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
