"""Bat: the MiSS variant whose update depends on the frozen weight."""
from ..declaration import FamilyDeclaration
from ..miss import format as miss_format
from . import format as official
from .family import Bat

DECLARATION = FamilyDeclaration(
    Bat, peft_types=("MISS", "BONE"), claims=miss_format.is_bat,
    check=miss_format.check,
    read=lambda config, tensors, source, options: official.read(config, tensors, source),
    bucket="tenfold.engine.buckets.bat:BatBucket",
    bench_settings=dict(target_modules=["q_proj", "v_proj"], r=16))

__all__ = ["DECLARATION", "Bat"]
