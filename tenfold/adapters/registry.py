"""Directory -> family: detect the checkpoint format, read it, validate it; and tenfold's own save.

adapter_config.json decides, tensor keys confirm: "format": "tenfold" is tenfold's own format (family named in the
file); otherwise the one family whose declaration (`<family>/__init__.py`) claims the config's peft_type:
  LORTA                  -> LoRTA PEFT fork
  LORA with tensor_rank  -> LoRETTA rep (official)
  LORA                   -> PEFT LoRA
  MISS or BONE           -> MiSS default/mini, or Bat with init_weights "bat"
  BOTTLENECK             -> LoRETTA adp (official, tensorized)
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint, limits
from .base import Adapter
from .declaration import FamilyDeclaration, ReadOptions, declarations
from .errors import AdapterFormatError, where
from .spec import ModelSpec
from .values import Values, shown

DECLARATIONS: dict[str, FamilyDeclaration] = declarations()
FAMILIES: dict[str, type[Adapter]] = {name: d.adapter for name, d in DECLARATIONS.items()}
SUPPORTED_PEFT_TYPES = tuple(sorted({t for d in DECLARATIONS.values() for t in d.peft_types}))


def detect(config: dict, config_path: Path) -> str:
    """The format a config describes: "tenfold", or the family whose official checkpoints it is."""
    if config.get("format") == checkpoint.TENFOLD_FORMAT:
        return "tenfold"
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterFormatError(f"{where(config_path, 'peft_type')}: expected one of {', '.join(SUPPORTED_PEFT_TYPES)}"
                                 f" (or \"format\": \"tenfold\"), found {shown(peft_type)}")
    claimed = [d.name for d in DECLARATIONS.values() if peft_type in d.peft_types and d.claims(config)]
    if len(claimed) > 1:  # a declaration's fault, not the user's
        raise RuntimeError(f"families {claimed} all claim peft_type {peft_type!r}: their `claims` must tell them apart")
    if not claimed:
        raise AdapterFormatError(f"{where(config_path, 'peft_type')}: unknown adapter type {shown(peft_type)}; tenfold "
                                 f"reads peft_type {', '.join(SUPPORTED_PEFT_TYPES)} and its own format "
                                 f"(\"format\": \"tenfold\")")
    return claimed[0]


def load_adapter(path, spec: ModelSpec | None = None, *, max_bytes: int | None = None,
                 lorta_orientation: str | None = None, max_rank: int | None = None) -> Adapter:
    """Read an adapter directory in any supported format; validate it against `spec` when given. Every value is
    checked before the memory or work it implies: files (`checkpoint.adapter_files`), the config's values and the
    ranks that size tables or contractions (within `max_rank`, an engine's --max-lora-rank) before any tensor is
    read, the tensor file's sizes before its data (`tensor_files`), and what the family densifies before anything
    contracts it. Raises AdapterError subclasses."""
    directory = Path(path)
    files = checkpoint.adapter_files(directory, max_bytes)
    config = checkpoint.read_config(directory, files)
    cfg_path = directory / checkpoint.CONFIG_NAME
    kind = detect(config, cfg_path)
    if kind == "tenfold":
        family = _tenfold_family(config, cfg_path)
        ranks = family.check_config(Values(config["config"], cfg_path, "config."))
        ranks = {f"config.{key}": rank for key, rank in ranks.items()}
    else:
        family = DECLARATIONS[kind].adapter
        ranks = DECLARATIONS[kind].check(config, cfg_path)
    limits.require_rank(ranks, max_rank, family.family, cfg_path)
    source = checkpoint.weights_file(directory, files)
    tensors = checkpoint.read_tensors(source, max_bytes)
    if kind == "tenfold":
        adapter = _read_tenfold(family, config, tensors, source)
    else:
        adapter = DECLARATIONS[kind].read(config, tensors, source, ReadOptions(lorta_orientation=lorta_orientation))
    if spec is not None:
        adapter.validate(spec)
    elif adapter.spec is not None:
        adapter.validate(adapter.spec)  # tenfold's format records the base model's shapes
    if adapter.spec is not None:  # validated: its shapes are sound
        if adapter.largest_lora_rank != adapter.rank:  # per-module ranks (tenfold's LoRA): the widest sizes the table
            limits.require_rank({"tensors": adapter.largest_lora_rank}, max_rank, adapter.family, source)
        entries, what = adapter.densified_entries()
        limits.require_dense_size(entries, adapter.dtype.itemsize, what, source, max_bytes)
    return adapter


def _tenfold_family(config: dict, cfg_path: Path) -> type[Adapter]:
    """The family tenfold's own format names, its version and declarations checked (before any tensor is read)."""
    version = config.get("format_version")
    if version != checkpoint.TENFOLD_FORMAT_VERSION or isinstance(version, bool):
        raise AdapterFormatError(f"{where(cfg_path, 'format_version')}: expected {checkpoint.TENFOLD_FORMAT_VERSION}, "
                                 f"found {shown(version)}")
    family = config.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise AdapterFormatError(f"{where(cfg_path, 'family')}: unknown family {shown(family)}; expected one of "
                                 f"{', '.join(FAMILIES)}")
    if not isinstance(config.get("config"), dict):
        raise AdapterFormatError(f"{where(cfg_path, 'config')}: expected an object of family hyperparameters")
    checkpoint.check_tenfold_declarations(config, cfg_path)
    return FAMILIES[family]


def _read_tenfold(family: type[Adapter], config: dict, tensors: dict, source: Path) -> Adapter:
    checkpoint.check_tenfold_tensors(config, tensors, source)
    spec = checkpoint.spec_from_json(config.get("base_model"), source.parent / checkpoint.CONFIG_NAME)
    return family(config["config"], tensors, spec=spec, source=source)


def save_adapter(adapter: Adapter, path) -> Path:
    """Write `adapter` in tenfold's own format."""
    return checkpoint.write_tenfold(adapter, Path(path))
