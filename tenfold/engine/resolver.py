"""Resolve an unknown `model` name to `<adapter root>/<name>` (env TENFOLD_ADAPTER_ROOT).

Names are validated before touching the filesystem: a short charset, no separators, no dot-dot, and the resolved
path must stay inside the root (symlinks included), so no request can name a file outside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

ROOT_ENV = "TENFOLD_ADAPTER_ROOT"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched in full: `$` would accept a final newline


class InvalidAdapterName(ValueError):
    pass


def adapter_path(root, name: str) -> Path:
    """The directory for `name` under `root`; InvalidAdapterName if the name is malformed or escapes the root."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapterName(f"invalid adapter name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
                                 f"starting with a letter or digit, without '..'")
    root = Path(root).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise InvalidAdapterName(f"adapter name {name!r} resolves outside the adapter root")
    return path


class AdapterRootResolver(LoRAResolver):
    def __init__(self, root):
        self.root = Path(root)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            path = adapter_path(self.root, lora_name)
        except InvalidAdapterName:
            return None  # vLLM answers 404 for names no resolver finds
        if not path.is_dir():
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))  # vLLM assigns the real id


def root_from_env() -> Path | None:
    value = os.environ.get(ROOT_ENV)
    return Path(value) if value else None
