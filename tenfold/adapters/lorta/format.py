"""The LoRTA PEFT fork's checkpoints: peft_type LORTA, model-global factors ``base_model.model.lora_A`` etc.

The fork applies x @ delta^T (``heads_in``); checkpoints trained with the lit-gpt trainer apply x @ delta
(``heads_out``) with the same five factors. The orientation is not recorded by either trainer: tenfold reads
``orientation`` from adapter_config.json when present, else the caller's choice, else the fork's ``heads_in``.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CONFIG_NAME
from ..errors import AdapterFormatError, AdapterKeyError, where
from .family import MATRICES, NAMES, ORIENTATIONS, LoRTA

# The fork's names for the four attention matrices, also accepted as target_modules.
SHORT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def read(config: dict, tensors: dict, source: Path, orientation: str | None = None) -> LoRTA:
    cfg_path = source.parent / CONFIG_NAME
    ours = {}
    for name, value in tensors.items():
        short = name.rsplit(".", 1)[-1]
        if short not in NAMES:
            raise AdapterKeyError(f"{where(source, name)}: not a LoRTA factor; expected keys ending in {list(NAMES)}")
        if short in ours:
            raise AdapterKeyError(f"{where(source, name)}: factor {short} appears twice")
        ours[short] = value
    chosen = config.get("orientation") or orientation or "heads_in"
    if chosen not in ORIENTATIONS:
        raise AdapterFormatError(f"{where(cfg_path, 'orientation')}: expected one of {ORIENTATIONS}, found {chosen!r}")
    targets = config.get("target_modules") or list(MATRICES)
    if isinstance(targets, str):
        targets = [targets]
    targets = [SHORT_NAMES.get(t, t) for t in targets]
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)):
            raise AdapterFormatError(f"{where(cfg_path, field)}: expected a number, found {config.get(field)!r}")
    return LoRTA({"r": config["r"], "lora_alpha": float(config["lora_alpha"]), "orientation": chosen,
                  "target_modules": sorted(targets)}, ours, source=source)
