"""Launch settings of the Triton kernels, importable without triton (the reference ops and the dispatch accept them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    """Overrides of the launch heuristics (tests, tuning); None keeps the heuristic. Fields an op has no use for,
    and every field for the torch reference ops, are ignored."""

    block_n: int | None = None            # output columns per program (expand kernels)
    block_k: int | None = None            # input columns per loop step (shrink kernels)
    splits: int | None = None             # programs sharing one tile's reduction; their partial sums stay apart in u
    heads_per_program: int | None = None  # LoRTA heads_out expand: heads handled by one program
    num_warps: int | None = None


DEFAULT = LaunchConfig()
