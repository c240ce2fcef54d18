"""The LoRTA PEFT fork's checkpoints: peft_type LORTA, model-global factors ``base_model.model.lora_A`` etc.

The fork applies x @ delta^T (``heads_in``); checkpoints trained with the lit-gpt trainer apply x @ delta
(``heads_out``) with the same five factors. The orientation is not recorded by either trainer: tenfold reads
``orientation`` from adapter_config.json when present, else the caller's choice, else the fork's ``heads_in``.

The fork's settings, as its code defines them (ihounie/peft, branch lorta, ``tuners/lorta``):
- each targeted module is a separate layer with its own scaling: alpha_m / r_m, or alpha_m / sqrt(r_m) with
  ``use_rslora``, where r_m and alpha_m come from ``rank_pattern`` / ``alpha_pattern`` (the first pattern key, rank
  keys before alpha keys, that matches the end of the module path ``model.layers.<i>.self_attn.<m>``; r_m changes
  only the scaling, the factors keep the config's r);
- a module is targeted by PEFT's rule (target_modules, layers_to_transform, layers_pattern); untargeted layers and
  matrices get no update.
tenfold folds a per-(layer, matrix) scaling into the shared factors (C_l and C_m) when it factors as layer x matrix
(always the case for per-matrix patterns and for layers_to_transform), and refuses it otherwise.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..checkpoint import CONFIG_NAME
from ..errors import AdapterFormatError, AdapterKeyError, AdapterMismatchError, where
from ..settings import Refusal, audit, check_peft_targeting, not_set, peft_targeted
from ..values import MAX_LAYERS, Values, positive_int, positive_number
from .family import MATRICES, NAMES, ORIENTATIONS, LoRTA

# The fork's names for the four attention matrices, also accepted as target_modules.
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
FORK_PATH = "model.layers.{layer}.self_attn.{module}"  # the paths the fork matches its targets and patterns against

HONOURED = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "layers_to_transform",
            "layers_pattern", "init_scale", "lora_dropout", "fan_in_fan_out", "init_lora_weights", "loftq_config",
            "megatron_core", "orientation")
REFUSED = (
    Refusal("use_dora", "false", lambda v: not v, "the fork does not implement DoRA for LoRTA"),
    Refusal("bias", "'none'", lambda v: v in (None, "none"), "bias training changes the base model's biases, which "
            "tenfold does not serve"),
    Refusal("modules_to_save", "null or []", not_set, "whole modules saved beside the adapter are not served"),
    Refusal("layer_replication", "null", not_set, "layer replication builds a different layer stack"),
    Refusal("megatron_config", "null", not_set, "Megatron-parallel layers are not served"),
    # the fork's layer initialisation is a no-op (the factors are created by the model), so these values mean nothing
    # at serving time; 'loftq' would need the quantized base
    Refusal("init_lora_weights", "true, false or 'gaussian'", lambda v: isinstance(v, bool) or v == "gaussian",
            "LoftQ initialisation needs the LoftQ-quantized base"),
)


FORK_PATTERN_REGEX = r".*\.{}$"  # how the fork matches a rank_pattern / alpha_pattern key against a module path


def _fork_pattern_key(keys, path):
    return next((k for k in keys if re.match(FORK_PATTERN_REGEX.replace("{}", k), path)), None)


def check(config: dict, cfg_path: Path) -> dict[str, int]:
    """Every setting audited and every value the fork reads checked; {key: rank}: r sizes every table."""
    audit(config, cfg_path, HONOURED, REFUSED, "LoRTA fork")
    values = Values(config, cfg_path)
    ranks = {"r": values.int("r")}
    values.number("lora_alpha", nonzero=True)  # the per-module scalings are folded relative to one of them
    values.flag("use_rslora")
    values.patterns("rank_pattern", FORK_PATTERN_REGEX, positive_int)  # only the scaling: the factors keep rank r
    values.patterns("alpha_pattern", FORK_PATTERN_REGEX, positive_number)
    check_peft_targeting(values)
    values.number("init_scale", None)
    values.fraction("lora_dropout")
    values.flag("fan_in_fan_out")
    if config.get("orientation") is not None:
        values.choice("orientation", ORIENTATIONS)
    return ranks


def read(config: dict, tensors: dict, source: Path, orientation: str | None = None) -> LoRTA:
    """A LoRTA adapter from a config `check` accepted, its tensors and the caller's orientation (when the config
    records none)."""
    cfg_path = source.parent / CONFIG_NAME
    ours, keys = {}, {}
    for name, value in tensors.items():
        short = name.rsplit(".", 1)[-1]
        if short not in NAMES:
            raise AdapterKeyError(f"{where(source, name)}: not a LoRTA factor; expected keys ending in {list(NAMES)}")
        if short in ours:
            raise AdapterKeyError(f"{where(source, name)}: factor {short} appears twice: expected one, found it also "
                                  f"under {keys[short]!r}")
        ours[short], keys[short] = value, name
    chosen = config.get("orientation") or orientation or "heads_in"
    if chosen not in ORIENTATIONS:
        raise AdapterFormatError(f"{where(cfg_path, 'orientation')}: expected one of {ORIENTATIONS}, found {chosen!r}")
    targets = config.get("target_modules") or list(MATRICES)
    if isinstance(targets, list):
        targets = [SHORT_NAMES.get(t, t) for t in targets]
    targeting = {"target_modules": targets, "layers_to_transform": config.get("layers_to_transform"),
                 "layers_pattern": config.get("layers_pattern")}
    if "lora_C_l" not in ours or ours["lora_C_l"].dim() != 2:
        num_layers = 0  # the family's constructor names the missing or malformed factor
    else:
        num_layers = ours["lora_C_l"].shape[0]
    if num_layers > MAX_LAYERS:  # before one targeting test per row
        raise AdapterMismatchError(f"{where(source, keys['lora_C_l'])}: expected one row per layer (at most "
                                   f"{MAX_LAYERS}), found {num_layers}")
    targeted = {(layer, m) for layer in range(num_layers) for m in MATRICES
                if peft_targeted(targeting, FORK_PATH.format(layer=layer, module=m))}
    modules = sorted({m for _, m in targeted})
    layers = sorted({layer for layer, _ in targeted})
    if num_layers and not targeted:
        raise AdapterFormatError(f"{where(cfg_path, 'target_modules')}: expected targets among the attention matrices "
                                 f"{list(MATRICES)} (with layers_to_transform {config.get('layers_to_transform')!r}), "
                                 f"found {config.get('target_modules')!r}, which adapts no module")
    if targeted != {(layer, m) for layer in layers for m in modules}:
        raise AdapterFormatError(
            f"{where(cfg_path, 'target_modules')}: expected the same attention matrices in every adapted layer (LoRTA's "
            f"factors are shared across layers), found {config.get('target_modules')!r}, which adapts different "
            f"matrices in different layers")
    # the fork's per-module scaling
    r, alpha = config["r"], float(config["lora_alpha"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    pattern_keys = list(rank_pattern) + list(alpha_pattern)
    scales = {}
    for layer, m in targeted:
        key = _fork_pattern_key(pattern_keys, FORK_PATH.format(layer=layer, module=m))
        r_m, alpha_m = rank_pattern.get(key, r), float(alpha_pattern.get(key, alpha))
        scales[layer, m] = alpha_m / math.sqrt(r_m) if config.get("use_rslora") else alpha_m / r_m
    ours_config = {"r": r, "lora_alpha": alpha, "use_rslora": bool(config.get("use_rslora")), "orientation": chosen,
                   "target_modules": modules}
    if layers != list(range(num_layers)):
        ours_config["layers"] = layers
    values = set(scales.values())
    if len(values) <= 1 and "layers" not in ours_config:
        ours_config["scale"] = values.pop() if values else alpha / r
    else:
        ours_config["scale"] = 1.0
        _fold_scales(ours, scales, layers, modules, num_layers, cfg_path)
    return LoRTA(ours_config, ours, source=source)


def _fold_scales(ours: dict, scales: dict, layers, modules, num_layers: int, cfg_path) -> None:
    """Write s[l, m] = u[l] * v[m] into C_l (rows of untargeted layers become zero) and C_m, or refuse."""
    l0, m0 = layers[0], modules[0]
    adapted = set(layers)
    u = [scales[layer, m0] / scales[l0, m0] if layer in adapted else 0.0 for layer in range(num_layers)]
    v = {m: scales[l0, m] for m in modules}
    for (layer, m), s in scales.items():
        if abs(u[layer] * v[m] - s) > 1e-9 * abs(s):
            raise AdapterFormatError(
                f"{where(cfg_path, 'rank_pattern/alpha_pattern')}: expected per-module scalings that factor as "
                f"(layer) x (matrix), which LoRTA's shared factors can hold; found scaling {s} at "
                f"layers.{layer}.{m} against {u[layer] * v[m]} from that product")
    c_l, c_m = ours.get("lora_C_l"), ours.get("lora_C_m")
    if c_l is None or c_m is None or c_m.dim() != 2 or c_m.shape[0] != len(MATRICES):
        return  # malformed factors: the family's checks name them
    ours["lora_C_l"] = (c_l.double() * torch.tensor(u, dtype=torch.float64)[:, None]).to(c_l.dtype)
    factor = torch.ones(c_m.shape[0], dtype=torch.float64)
    for m, value in v.items():
        factor[MATRICES.index(m)] = value
    ours["lora_C_m"] = (c_m.double() * factor[:, None]).to(c_m.dtype)
