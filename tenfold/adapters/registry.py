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

from . import checkpoint
from .base import Adapter
from .declaration import FamilyDeclaration, ReadOptions, declarations
from .errors import AdapterFormatError, where
from .spec import ModelSpec

DECLARATIONS: dict[str, FamilyDeclaration] = declarations()
FAMILIES: dict[str, type[Adapter]] = {name: d.adapter for name, d in DECLARATIONS.items()}
SUPPORTED_PEFT_TYPES = tuple(sorted({t for d in DECLARATIONS.values() for t in d.peft_types}))


def detect(config: dict, config_path: Path) -> str:
    """The format a config describes: "tenfold", or the family whose official checkpoints it is."""
    if config.get("format") == checkpoint.TENFOLD_FORMAT:
        return "tenfold"
    peft_type = config.get("peft_type")
    claimed = [d.name for d in DECLARATIONS.values() if peft_type in d.peft_types and d.claims(config)]
    if len(claimed) > 1:  # a declaration's fault, not the user's
        raise RuntimeError(f"families {claimed} all claim peft_type {peft_type!r}: their `claims` must tell them apart")
    if not claimed:
        raise AdapterFormatError(f"{where(config_path, 'peft_type')}: unknown adapter type {peft_type!r}; tenfold "
                                 f"reads peft_type {', '.join(SUPPORTED_PEFT_TYPES)} and its own format "
                                 f"(\"format\": \"tenfold\")")
    return claimed[0]


def load_adapter(path, spec: ModelSpec | None = None, *, max_bytes: int | None = None,
                 lorta_orientation: str | None = None) -> Adapter:
    """Read an adapter directory in any supported format; validate it against `spec` when given."""
    directory = Path(path)
    config = checkpoint.read_config(directory)
    kind = detect(config, directory / checkpoint.CONFIG_NAME)
    source = checkpoint.weights_file(directory)
    tensors = checkpoint.read_tensors(source, max_bytes)
    if kind == "tenfold":
        adapter = _read_tenfold(config, tensors, source)
    else:
        adapter = DECLARATIONS[kind].read(config, tensors, source, ReadOptions(lorta_orientation=lorta_orientation))
    if spec is not None:
        adapter.validate(spec)
    elif adapter.spec is not None:
        adapter.validate(adapter.spec)  # tenfold's format records the base model's shapes
    return adapter


def _read_tenfold(config: dict, tensors: dict, source: Path) -> Adapter:
    cfg_path = source.parent / checkpoint.CONFIG_NAME
    version = config.get("format_version")
    if version != checkpoint.TENFOLD_FORMAT_VERSION:
        raise AdapterFormatError(f"{where(cfg_path, 'format_version')}: expected {checkpoint.TENFOLD_FORMAT_VERSION}, "
                                 f"found {version!r}")
    family = config.get("family")
    if family not in FAMILIES:
        raise AdapterFormatError(f"{where(cfg_path, 'family')}: unknown family {family!r}; expected one of "
                                 f"{', '.join(FAMILIES)}")
    if not isinstance(config.get("config"), dict):
        raise AdapterFormatError(f"{where(cfg_path, 'config')}: expected an object of family hyperparameters")
    checkpoint.check_tenfold_tensors(config, tensors, source)
    try:
        spec = checkpoint.spec_from_json(config.get("base_model"))
    except TypeError as e:
        raise AdapterFormatError(f"{where(cfg_path, 'base_model')}: malformed base model shapes ({e})") from None
    return FAMILIES[family](config["config"], tensors, spec=spec, source=source)


def save_adapter(adapter: Adapter, path) -> Path:
    """Write `adapter` in tenfold's own format."""
    return checkpoint.write_tenfold(adapter, Path(path))
