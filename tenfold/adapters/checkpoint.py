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
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import strict_json
from .errors import AdapterFormatError, AdapterKeyError, AdapterTooLargeError, where
from .limits import (MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_TENSOR_DIMS, MAX_TENSOR_NAME, MAX_TENSORS,
                     max_adapter_bytes)
from .tensor_files import SAFETENSORS_DTYPES, read_pickle, read_safetensors
from .values import MAX_LAYERS, Values, is_int, shown

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
ADAPTER_FILE_NAMES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME)
TENFOLD_FORMAT = "tenfold"
TENFOLD_FORMAT_VERSION = 1


def fingerprint(path) -> str:
    """Identity of an adapter version: size, mtime and inode of its config and tensor files. Changes whenever the
    files are rewritten, so prefix-cache keys and worker caches notice a reloaded adapter."""
    directory = Path(path)
    parts = []
    for name in ADAPTER_FILE_NAMES:
        try:
            st = (directory / name).stat()
        except FileNotFoundError:
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def adapter_files(directory, max_bytes: int | None = None) -> dict[str, Path]:
    """The adapter's files that exist ({name: the file itself}, of adapter_config.json, adapter_model.safetensors
    and adapter_model.bin), each a regular file inside `directory` (a symbolic link is followed only to a file
    inside it) within its size limit (MAX_CONFIG_BYTES for the config, `max_bytes` or TENFOLD_MAX_ADAPTER_BYTES for
    tensors); nothing is read. The one rule every reader applies, and what an adapter snapshot copies."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory; an adapter is a directory holding {CONFIG_NAME} "
                                 f"and {SAFETENSORS_NAME} (or {BIN_NAME})")
    found = {}
    for name in ADAPTER_FILE_NAMES:
        path = directory / name
        if os.path.lexists(path):
            found[name] = _checked_file(path, _size_limit(name, max_bytes))[0]
    return found


def _size_limit(name: str, max_bytes: int | None) -> int:
    if name == CONFIG_NAME:
        return MAX_CONFIG_BYTES
    return max_adapter_bytes() if max_bytes is None else max_bytes


def _checked_file(path: Path, limit: int) -> tuple[Path, int]:
    """(the file `path` names, its size): a regular file inside path's directory, within `limit` bytes."""
    target = path.resolve()
    if not target.is_relative_to(path.parent.resolve()):
        raise AdapterFormatError(f"{path}: a symbolic link to {target}, outside the adapter's directory; expected the "
                                 f"file itself (or a link to a file inside the directory)")
    try:
        st = target.stat()
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot be opened ({e.strerror}); expected a readable regular file") from None
    return target, _check_stat(path, st, limit)


def _check_stat(path: Path, st: os.stat_result, limit: int) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFormatError(f"{path}: expected a regular file, found a {_kind(st.st_mode)}")
    if st.st_size > limit:
        if path.name == CONFIG_NAME:
            raise AdapterTooLargeError(f"{path}: {st.st_size} bytes, over the limit for {CONFIG_NAME} of {limit} "
                                       f"bytes")
        raise AdapterTooLargeError(f"{path}: {st.st_size} bytes, over the adapter size limit of {limit} bytes "
                                   f"(TENFOLD_MAX_ADAPTER_BYTES)")
    return st.st_size


def _kind(mode: int) -> str:
    return ("directory" if stat.S_ISDIR(mode) else "named pipe" if stat.S_ISFIFO(mode) else "socket"
            if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")


def _open(path: Path, limit: int):
    """(open binary file, size) for the adapter file `path`, checked by `_checked_file` and again on the open
    descriptor (a file swapped between the check and the open is caught)."""
    target, _ = _checked_file(path, limit)
    try:
        f = open(target, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW))
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot be opened ({e.strerror})") from None
    try:
        return f, _check_stat(path, os.fstat(f.fileno()), limit)
    except BaseException:
        f.close()
        raise


def read_config(directory: Path, files: dict[str, Path] | None = None) -> dict:
    """adapter_config.json, parsed strictly (`strict_json`: size, nesting, finite numbers, unique keys);
    `files` is `adapter_files(directory)` when the caller has it."""
    directory = Path(directory)
    files = adapter_files(directory) if files is None else files
    path = directory / CONFIG_NAME
    if CONFIG_NAME not in files:
        raise AdapterFormatError(f"{path}: missing; every adapter directory needs {CONFIG_NAME}")
    f, size = _open(path, MAX_CONFIG_BYTES)
    with f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterTooLargeError(f"{path}: over the limit for {CONFIG_NAME} of {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    config = strict_json.loads(text, path, MAX_CONFIG_DEPTH)
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def weights_file(directory: Path, files: dict[str, Path] | None = None) -> Path:
    """The adapter's tensor file (safetensors preferred), as the user names it (messages name this path)."""
    directory = Path(directory)
    files = adapter_files(directory) if files is None else files
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if name in files:
            return directory / name
    raise AdapterFormatError(f"{directory}: no tensor file: expected {SAFETENSORS_NAME} or {BIN_NAME}")


def read_tensors(path: Path, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or pickled .bin file, on CPU; every size checked before the memory it implies is
    taken (`tensor_files`)."""
    path = Path(path)
    f, size = _open(path, _size_limit(path.name, max_bytes))
    with f:
        tensors = read_safetensors(f, size, path) if path.suffix == ".safetensors" else read_pickle(f, size, path)
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


def check_tenfold_declarations(config: dict, cfg_path: Path) -> None:
    """tenfold's format, before any tensor is read: the declared tensors (names, shapes, dtypes) and the base model's
    shapes."""
    declared = config.get("tensors")
    if not isinstance(declared, dict) or not 0 < len(declared) <= MAX_TENSORS:
        raise AdapterFormatError(f"{where(cfg_path, 'tensors')}: expected a mapping of 1 to {MAX_TENSORS} tensor names "
                                 f"to their shapes and dtypes")
    for name, entry in declared.items():
        if len(name) > MAX_TENSOR_NAME:
            raise AdapterFormatError(f"{where(cfg_path, 'tensors')}: expected tensor names of at most "
                                     f"{MAX_TENSOR_NAME} characters, found one of {len(name)}")
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(is_int(n) and n >= 0 for n in shape)):
            raise AdapterFormatError(f"{where(cfg_path, f'tensors.{name}.shape')}: expected a list of at most "
                                     f"{MAX_TENSOR_DIMS} non-negative integers, found {shown(shape)}")
        if entry.get("dtype") is not None and not (isinstance(entry["dtype"], str) and entry["dtype"] in _DTYPE_NAMES):
            raise AdapterFormatError(f"{where(cfg_path, f'tensors.{name}.dtype')}: expected one of "
                                     f"{', '.join(_DTYPE_NAMES)}, found {shown(entry['dtype'])}")
    spec_from_json(config.get("base_model"), cfg_path)


_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in SAFETENSORS_DTYPES.values()}


def check_tenfold_tensors(config: dict, tensors: dict, source: Path) -> None:
    """The JSON's declared tensors (checked by `check_tenfold_declarations`) and the file's must agree exactly."""
    declared = config["tensors"]
    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise AdapterKeyError(f"{where(source)}: tensors disagree with {CONFIG_NAME}: missing {missing[:5]}, "
                              f"undeclared {extra[:5]}")
    for name, entry in declared.items():
        if list(tensors[name].shape) != entry["shape"]:
            raise AdapterFormatError(f"{where(source, name)}: {CONFIG_NAME} declares shape {entry['shape']}, the "
                                     f"file holds {list(tensors[name].shape)}")
        dtype = entry.get("dtype")
        if dtype is not None and _DTYPE_NAMES[dtype] != tensors[name].dtype:
            raise AdapterFormatError(f"{where(source, name)}: {CONFIG_NAME} declares dtype {dtype}, the file holds "
                                     f"{str(tensors[name].dtype).removeprefix('torch.')}")


def spec_to_json(spec) -> dict:
    return {
        "num_layers": spec.num_layers, "hidden_size": spec.hidden_size, "num_heads": spec.num_heads,
        "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
        "model_type": spec.model_type, "dtype": str(spec.dtype).removeprefix("torch."), "name": spec.name,
    }


_SPEC_SIZES = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
SPEC_DTYPES = ("float32", "bfloat16", "float16", "float64")


def spec_from_json(data: dict | None, cfg_path=None):
    """The base model's shapes tenfold's format records (written by `spec_to_json`), every value checked."""
    from .spec import SUPPORTED_MODEL_TYPES, ModelSpec

    if data is None or data == {}:
        return None
    values = Values(data, cfg_path, "base_model.")
    unknown = sorted(k for k in data if k not in ("num_layers", "model_type", "dtype", "name", *_SPEC_SIZES))
    if unknown:
        values.fail(unknown[0], "no such key in base_model")
    sizes = {key: values.int(key) for key in _SPEC_SIZES}
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        values.fail("num_kv_heads", f"a divisor of num_heads ({sizes['num_heads']})")
    return ModelSpec(num_layers=values.int("num_layers", maximum=MAX_LAYERS), **sizes,
                     model_type=values.choice("model_type", SUPPORTED_MODEL_TYPES, "llama"),
                     dtype=getattr(torch, values.choice("dtype", SPEC_DTYPES, "float32")), name=values.text("name"))
