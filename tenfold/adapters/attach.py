"""Attach an adapter to a HuggingFace transformers model (like PEFT's get_peft_model), for inference or training.

Each targeted nn.Linear is swapped for an AdaptedLinear that calls the family's on-the-fly `forward`; `detach()`
puts the original modules back, leaving the model exactly as it was. The adapter's parameters stay in the adapter
(train them with an optimizer over `adapter.parameters()`); the base weights are not touched.
"""

from __future__ import annotations

import re

from torch import nn

from .base import Adapter, ModuleKey, key_name
from .errors import AdapterKeyError
from .spec import ModelSpec

_LINEAR_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?(\w+)$")


class AdaptedLinear(nn.Module):
    """A frozen linear module plus one adapter's update for one (layer, module)."""

    def __init__(self, base: nn.Module, adapter: Adapter, key: ModuleKey):
        super().__init__()
        self.base = base
        self.key = key
        object.__setattr__(self, "adapter", adapter)  # not a submodule: the adapter is owned by the Attachment

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.adapter.forward(self.key, x, self.base)

    def extra_repr(self) -> str:
        return f"{self.adapter.family} at {key_name(self.key)}"


def find_linears(model: nn.Module) -> dict[ModuleKey, tuple[nn.Module, str, nn.Module]]:
    """{(layer, name): (parent, attribute, module)} for every per-layer nn.Linear of a decoder model (or the
    AdaptedLinear that currently wraps it)."""
    found = {}
    for path, module in model.named_modules():
        m = _LINEAR_PATH.search(path)
        if m and (isinstance(module, AdaptedLinear) or (isinstance(module, nn.Linear) and m.group(2) != "base")):
            parent_path, _, attr = path.rpartition(".")
            found[(int(m.group(1)), m.group(2))] = (model.get_submodule(parent_path), attr, module)
    return found


class Attachment:
    """The handle `attach` returns: detach() (or leaving the `with` block) restores the model."""

    def __init__(self, model: nn.Module, adapter: Adapter, replaced: dict):
        self.model, self.adapter, self._replaced = model, adapter, replaced

    def detach(self) -> None:
        for parent, attr, original in self._replaced.values():
            setattr(parent, attr, original)
        self._replaced = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def attach(model: nn.Module, adapter: Adapter, validate: bool = True) -> Attachment:
    """Apply `adapter` to `model` in place; validates the adapter against the model's config first."""
    if validate:
        adapter.validate(ModelSpec.from_hf_config(model.config))
    linears = find_linears(model)
    missing = [key_name(k) for k in adapter.targets if k not in linears]
    if missing:
        raise AdapterKeyError(f"{adapter.family} adapter targets modules the model does not have: {missing[:5]}")
    replaced = {}
    for key in adapter.targets:
        parent, attr, module = linears[key]
        if isinstance(module, AdaptedLinear):
            raise ValueError(f"{key_name(key)} already carries an adapter; detach it first")
        setattr(parent, attr, AdaptedLinear(module, adapter, key))
        replaced[key] = (parent, attr, module)
    adapter.to(device=next(model.parameters()).device)
    return Attachment(model, adapter, replaced)
