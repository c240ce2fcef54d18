"""LoRETTA adp: tensorized bottleneck adapters."""
from ..declaration import FamilyDeclaration
from . import format as official
from .family import LoRETTAAdp

DECLARATION = FamilyDeclaration(
    LoRETTAAdp, peft_types=("BOTTLENECK",), claims=lambda config: True,
    check=official.check,
    read=lambda config, tensors, source, options: official.read(config, tensors, source),
    bucket="tenfold.engine.buckets.bottleneck:BottleneckBucket",
    bench_settings=dict(bottleneck_size=64))

__all__ = ["DECLARATION", "LoRETTAAdp"]
