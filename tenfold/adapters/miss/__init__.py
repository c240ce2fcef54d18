"""Bone / MiSS block-affine adapters (default and mini)."""
from ..declaration import FamilyDeclaration
from ..spec import LINEAR_MODULES
from . import format as official
from .family import MiSS

DECLARATION = FamilyDeclaration(
    MiSS, peft_types=("MISS", "BONE"), claims=lambda config: not official.is_bat(config),
    check=official.check,
    read=lambda config, tensors, source, options: official.read(config, tensors, source),
    bucket="tenfold.engine.buckets.miss:MissBucket",
    bench_settings=dict(target_modules=list(LINEAR_MODULES), r=16))

__all__ = ["DECLARATION", "MiSS"]
