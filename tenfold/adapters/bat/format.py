"""Bat checkpoints: PEFT MiSS / Bone directories with init_weights "bat" (the MiSS reader's parsing, Bat's meaning)."""

from __future__ import annotations

from pathlib import Path

from ..miss.format import parsed
from .family import Bat


def read(config: dict, tensors: dict, source: Path) -> Bat:
    common, ours = parsed(config, tensors, source)
    return Bat(common, ours, source=source)
