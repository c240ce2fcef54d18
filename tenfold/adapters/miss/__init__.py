"""Bone / MiSS block-affine adapters (default and mini)."""
from .family import MiSS

__all__ = ["MiSS"]
