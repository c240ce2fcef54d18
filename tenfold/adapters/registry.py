"""Directory -> family: detect the checkpoint format, read it, validate it; and tenfold's own save.

Detection order (adapter_config.json decides, tensor keys confirm):
  "format": "tenfold"              -> tenfold's own format, family named in the file
  peft_type LORTA                  -> LoRTA PEFT fork
  peft_type LORA with tensor_rank  -> LoRETTA rep (official)
  peft_type LORA                   -> PEFT LoRA
  peft_type MISS or BONE           -> MiSS default/mini or Bat, by init_weights
  peft_type BOTTLENECK             -> LoRETTA adp (official, tensorized)
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .base import Adapter
from .bat import Bat
from .errors import AdapterFormatError, where
from .lora import LoRA
from .lora import format as lora_format
from .loretta_adp import LoRETTAAdp
from .loretta_adp import format as loretta_adp_format
from .loretta_rep import LoRETTARep
from .loretta_rep import format as loretta_rep_format
from .lorta import LoRTA
from .lorta import format as lorta_format
from .miss import MiSS
from .miss import format as miss_format
from .spec import ModelSpec

FAMILIES: dict[str, type[Adapter]] = {cls.family: cls for cls in (LoRA, LoRTA, LoRETTARep, LoRETTAAdp, MiSS, Bat)}
SUPPORTED_PEFT_TYPES = ("LORA", "LORTA", "MISS", "BONE", "BOTTLENECK")


def detect(config: dict, config_path: Path) -> str:
    """The name of the format a config describes."""
    if config.get("format") == checkpoint.TENFOLD_FORMAT:
        return "tenfold"
    peft_type = config.get("peft_type")
    if peft_type == "LORTA":
        return "lorta"
    if peft_type == "LORA":
        return "loretta_rep" if config.get("tensor_rank") is not None else "lora"
    if peft_type in ("MISS", "BONE"):
        return "miss"
    if peft_type == "BOTTLENECK":
        return "loretta_adp"
    raise AdapterFormatError(f"{where(config_path, 'peft_type')}: unknown adapter type {peft_type!r}; tenfold reads "
                             f"peft_type {', '.join(SUPPORTED_PEFT_TYPES)} and its own format (\"format\": \"tenfold\")")


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
    elif kind == "lorta":
        adapter = lorta_format.read(config, tensors, source, lorta_orientation)
    else:
        reader = {"lora": lora_format.read, "loretta_rep": loretta_rep_format.read, "miss": miss_format.read,
                  "loretta_adp": loretta_adp_format.read}[kind]
        adapter = reader(config, tensors, source)
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
