"""Reading and writing adapter directories: config JSON, tensor files, the size limit, tenfold's own format.

Every foreign format is a PEFT-style directory (adapter_config.json + adapter_model.safetensors or a pickled
adapter_model.bin); pickles are only ever opened with ``torch.load(weights_only=True)``. tenfold's own format is the
same layout with an explicit family, hyperparameters, the base model's shapes and every tensor's shape in the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AdapterFormatError, AdapterKeyError, AdapterTooLargeError, where

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
TENFOLD_FORMAT = "tenfold"
TENFOLD_FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 4 << 30


def max_adapter_bytes() -> int:
    """The size limit for one adapter's tensor file: env TENFOLD_MAX_ADAPTER_BYTES, default 4 GiB."""
    value = os.environ.get("TENFOLD_MAX_ADAPTER_BYTES")
    return int(value) if value else DEFAULT_MAX_BYTES


def fingerprint(path) -> str:
    """Identity of an adapter version: size, mtime and inode of its config and tensor files. Changes whenever the
    files are rewritten, so prefix-cache keys and worker caches notice a reloaded adapter."""
    directory = Path(path)
    parts = []
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise AdapterFormatError(f"{directory}: not a directory; an adapter is a directory holding {CONFIG_NAME} "
                                 f"and {SAFETENSORS_NAME} (or {BIN_NAME})")
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing; every adapter directory needs {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def weights_file(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = Path(directory) / name
        if path.is_file():
            return path
    raise AdapterFormatError(f"{directory}: no tensor file: expected {SAFETENSORS_NAME} or {BIN_NAME}")


def read_tensors(path: Path, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or pickled .bin file, on CPU; size-limited before anything is parsed."""
    limit = max_adapter_bytes() if max_bytes is None else max_bytes
    size = path.stat().st_size
    if size > limit:
        raise AdapterTooLargeError(f"{path}: {size} bytes, over the adapter size limit of {limit} bytes "
                                   f"(TENFOLD_MAX_ADAPTER_BYTES)")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    else:
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and unpickler errors all mean the same thing here
            raise AdapterFormatError(f"{path}: cannot be read as a weights-only torch pickle ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFormatError(f"{path}: expected a mapping of tensor names to tensors")
    if not tensors:
        raise AdapterFormatError(f"{path}: holds no tensors")
    return tensors


_MODULE_KEY = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:\w+\.)*?(?P<module>\w+)\.(?P<rest>{rest})$")


# Path segments of components that are not the text decoder (multimodal checkpoints): their "layers.<i>.q_proj" would
# otherwise be read as the language model's.
NON_TEXT_PARTS = ("vision", "visual", "image", "audio", "speech", "multi_modal", "mm_projector", "encoder")


def group_by_module(tensors: dict, rest_pattern: str, source: Path, paths: dict | None = None):
    """Sort per-module checkpoint keys (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``) into
    {(3, "q_proj"): {"lora_A.weight": tensor}}; `paths`, when given, receives each module's full path. Any key that
    is not of that form is an error: a checkpoint is taken whole or not at all. So are two keys for the same module
    and tensor, and keys of another layer stack than the text decoder's (a vision tower's ``layers.0.q_proj``):
    each would silently replace or join the text model's tensors."""
    pattern = re.compile(_MODULE_KEY.pattern.replace("{rest}", rest_pattern))
    matched, unmatched = [], []
    for name, value in tensors.items():
        m = pattern.search(name)
        if m is None:
            unmatched.append(name)
        else:
            matched.append((name, value, m, (int(m.group("layer")), m.group("module")), m.group("rest"),
                            name[: m.start("layer") - len("layers.")]))
    # first the stacks (path before "layers.<i>"): a non-text component is named as such, with the text model's key
    # it would have joined
    stacks: dict[str, str] = {}
    for name, _, _, _, _, stack in matched:
        stacks.setdefault(stack, name)
    text_stacks = [s for s in stacks if not any(t in part for part in s.lower().split(".") for t in NON_TEXT_PARTS)]
    for name, _, _, key, rest, stack in matched:
        if stack in text_stacks:
            continue
        twin = next((n for n, _, _, k, r, s in matched if s in text_stacks and (k, r) == (key, rest)),
                    stacks[text_stacks[0]] if text_stacks else None)
        raise AdapterKeyError(
            f"{where(source, name)}: a tensor for a module outside the served text model (path {stack!r}); expected "
            f"only the text decoder's layers{f' (like {twin!r})' if twin else ''}; tenfold serves adapters of the "
            f"text model only")
    if len(stacks) > 1:
        (a, key_a), (b, key_b) = list(stacks.items())[:2]
        raise AdapterKeyError(
            f"{where(source, key_b)}: tensors of two different layer stacks: expected one text model, found {a!r} "
            f"(e.g. {key_a!r}) and {b!r}; refusing to merge them")
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    first_key: dict = {}
    for name, value, m, key, rest, _ in matched:
        if (key, rest) in first_key:
            raise AdapterKeyError(
                f"{where(source, name)}: a second tensor for {rest} of layers.{key[0]}.{key[1]}: expected one, found "
                f"it also under {first_key[key, rest]!r}; refusing to pick one")
        first_key[key, rest] = name
        grouped.setdefault(key, {})[rest] = value
        if paths is not None:
            paths[key] = name[: m.start("rest") - 1]
    if unmatched:
        raise AdapterKeyError(
            f"{where(source)}: {len(unmatched)} tensor key(s) match no per-layer module of the expected form "
            f"'...layers.<i>.<module>.{rest_pattern}', e.g. {unmatched[:3]}; refusing a checkpoint that would only "
            f"partly apply")
    if not grouped:
        raise AdapterKeyError(f"{where(source)}: no tensor key names a module")
    return grouped


def write_tenfold(adapter, directory: Path) -> Path:
    """Save an adapter in tenfold's own format (PEFT-style directory, explicit family and shapes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in adapter.tensors().items()}
    config = {
        "format": TENFOLD_FORMAT,
        "format_version": TENFOLD_FORMAT_VERSION,
        "family": adapter.family,
        "config": adapter.config,
        "target_modules": adapter.target_modules(),
        "base_model": spec_to_json(adapter.spec) if adapter.spec is not None else None,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for name, t in tensors.items()},
    }
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt", "tenfold_family": adapter.family})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def check_tenfold_tensors(config: dict, tensors: dict, source: Path) -> None:
    """The JSON's declared tensors and the file's tensors must agree exactly."""
    declared = config.get("tensors")
    if not isinstance(declared, dict):
        raise AdapterFormatError(f"{where(source.parent / CONFIG_NAME, 'tensors')}: expected a mapping of tensor names "
                                 f"to shapes")
    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise AdapterKeyError(f"{where(source)}: tensors disagree with {CONFIG_NAME}: missing {missing[:5]}, "
                              f"undeclared {extra[:5]}")
    for name, entry in declared.items():
        if list(tensors[name].shape) != list(entry.get("shape", [])):
            raise AdapterFormatError(f"{where(source, name)}: {CONFIG_NAME} declares shape {entry.get('shape')}, the "
                                     f"file holds {list(tensors[name].shape)}")


def spec_to_json(spec) -> dict:
    return {
        "num_layers": spec.num_layers, "hidden_size": spec.hidden_size, "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
        "model_type": spec.model_type, "dtype": str(spec.dtype).removeprefix("torch."), "name": spec.name,
    }


def spec_from_json(data: dict | None):
    from .spec import ModelSpec

    if not data:
        return None
    data = dict(data)
    data["dtype"] = getattr(torch, data.get("dtype") or "float32")
    return ModelSpec(**data)
