"""Plain LoRA, the baseline every user has."""
from ..declaration import FamilyDeclaration
from ..spec import LINEAR_MODULES
from . import format as official
from .family import LoRA

DECLARATION = FamilyDeclaration(
    LoRA, peft_types=("LORA",), claims=lambda config: config.get("tensor_rank") is None,  # with it: LoRETTA rep
    check=official.check,
    read=lambda config, tensors, source, options: official.read(config, tensors, source),
    bucket="tenfold.engine.buckets.lowrank:LowRankBucket",
    bench_settings=dict(target_modules=list(LINEAR_MODULES), r=16))

__all__ = ["DECLARATION", "LoRA"]
