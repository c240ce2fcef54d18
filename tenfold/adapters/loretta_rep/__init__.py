"""LoRETTA rep: tensor-train reparameterized LoRA."""
from .family import LoRETTARep

__all__ = ["LoRETTARep"]
