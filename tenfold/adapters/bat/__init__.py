"""Bat: the MiSS variant whose update depends on the frozen weight."""
from .family import Bat

__all__ = ["Bat"]
