"""Adapter families: formats, math (dense delta and exact LoRA form), trainable modules and validation.

    from tenfold.adapters import load_adapter, ModelSpec, attach
    adapter = load_adapter("path/to/adapter", ModelSpec.from_pretrained("path/to/base"))
"""

from .attach import Attachment, attach
from .base import Adapter, ModuleKey
from .errors import (AdapterError, AdapterFormatError, AdapterKeyError, AdapterMismatchError, AdapterTooLargeError,
                     AdapterValueError, NoExactLoRAError)
from .registry import FAMILIES, load_adapter, save_adapter
from .spec import ModelSpec

__all__ = [
    "Adapter", "ModuleKey", "ModelSpec", "FAMILIES", "load_adapter", "save_adapter", "attach", "Attachment",
    "AdapterError", "AdapterFormatError", "AdapterKeyError", "AdapterMismatchError", "AdapterTooLargeError",
    "AdapterValueError", "NoExactLoRAError",
]
