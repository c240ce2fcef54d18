"""LoRTA: low-rank CP tensor shared by all layers, attention matrices and heads."""
from .family import LoRTA

__all__ = ["LoRTA"]
