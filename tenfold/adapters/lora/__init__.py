"""Plain LoRA, the baseline every user has."""
from .family import LoRA

__all__ = ["LoRA"]
