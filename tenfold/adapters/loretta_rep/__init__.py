"""LoRETTA rep: tensor-train reparameterized LoRA."""
from ..declaration import FamilyDeclaration
from . import format as official
from .family import LoRETTARep

DECLARATION = FamilyDeclaration(
    LoRETTARep, peft_types=("LORA",), claims=lambda config: config.get("tensor_rank") is not None,  # the official fork
    check=official.check,
    read=lambda config, tensors, source, options: official.read(config, tensors, source),
    bucket="tenfold.engine.buckets.lowrank:LowRankBucket",
    bench_settings=dict(r=8))

__all__ = ["DECLARATION", "LoRETTARep"]
