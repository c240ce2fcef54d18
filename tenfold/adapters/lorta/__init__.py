"""LoRTA: low-rank CP tensor shared by all layers, attention matrices and heads."""
from ..declaration import FamilyDeclaration
from . import format as official
from .family import LoRTA

DECLARATION = FamilyDeclaration(
    LoRTA, peft_types=("LORTA",), claims=lambda config: True,
    check=official.check,
    read=lambda config, tensors, source, options: official.read(config, tensors, source, options.lorta_orientation),
    bucket="tenfold.engine.buckets.lorta:LoRTABucket",
    bench_settings=dict(r=16))  # q, k, v, o

__all__ = ["DECLARATION", "LoRTA"]
