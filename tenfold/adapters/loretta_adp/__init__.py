"""LoRETTA adp: tensorized bottleneck adapters."""
from .family import LoRETTAAdp

__all__ = ["LoRETTAAdp"]
