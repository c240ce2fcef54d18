"""Tensor-train helpers shared by the LoRETTA families.

A TT matrix of `rows x cols` is stored as cores G_k [t_{k-1}, n_k, t_k] with t_0 = t_K = 1 and prod(n_k) =
rows * cols; contracting the cores in order and reshaping row-major gives the matrix (LoRETTA's convention).
"""

from __future__ import annotations

import math

import torch

from .errors import AdapterMismatchError, where
from .limits import require_dense_size


def mode_product(cores: list[torch.Tensor], source, name: str) -> int:
    """The product of the cores' mode sizes (the entries of their contraction); every core must be 3-d."""
    for k, core in enumerate(cores):
        if core.dim() != 3:
            raise AdapterMismatchError(f"{where(source, f'{name}.{k}')}: expected a 3-d TT core [t_in, n, t_out], "
                                       f"found shape {list(core.shape)}")
    return math.prod(c.shape[1] for c in cores)


def check_cores(cores: list[torch.Tensor], numel: int, source, name: str, tensor_rank: int | None = None) -> None:
    """Cores must be 3-d, chain their ranks, start and end at rank 1, keep every TT rank within `tensor_rank` (the
    config's) and hold `numel` entries in all."""
    found = mode_product(cores, source, name)
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise AdapterMismatchError(f"{where(source, name)}: the first core must start and the last end with TT rank 1, "
                                   f"found {list(cores[0].shape)} ... {list(cores[-1].shape)}")
    for k in range(1, len(cores)):
        if cores[k - 1].shape[-1] != cores[k].shape[0]:
            raise AdapterMismatchError(f"{where(source, f'{name}.{k}')}: TT rank {cores[k].shape[0]} does not match the "
                                       f"previous core's {cores[k - 1].shape[-1]}")
    if tensor_rank is not None:
        for k, core in enumerate(cores[:-1]):
            if core.shape[-1] > tensor_rank:
                raise AdapterMismatchError(f"{where(source, f'{name}.{k}')}: TT rank {core.shape[-1]} exceeds the "
                                           f"config's tensor_rank {tensor_rank}")
    if found != numel:
        raise AdapterMismatchError(f"{where(source, name)}: the cores' mode sizes multiply to {found}, expected {numel}")


def contraction_size(cores: list[torch.Tensor]) -> tuple[int, int]:
    """(entries of the contracted matrix, entries of the largest intermediate result) of contracting `cores` in
    order, from their shapes alone."""
    modes, peak = 1, 0
    for core in cores:
        modes *= core.shape[1]
        peak = max(peak, modes * core.shape[-1])
    return modes, peak


def tt_matrix(cores: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Contract the cores in order and reshape row-major to [rows, cols]; refused before any work when the result
    or an intermediate would exceed the adapter size limit (loaded adapters were checked as a whole already)."""
    _, peak = contraction_size(cores)
    require_dense_size(max(peak, rows * cols), cores[0].element_size(), "contracting these TT cores", None)
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.reshape(rows, cols)


def mode_shape(numel: int, max_mode: int = 16) -> list[int]:
    """A balanced factorization of `numel` into modes no larger than `max_mode` where possible (for new adapters;
    loaded checkpoints carry their own mode sizes in the core shapes)."""
    modes, rest = [], numel
    while rest > 1:
        factor = next((f for f in range(max_mode, 1, -1) if rest % f == 0), rest)
        modes.append(factor)
        rest //= factor
    return sorted(modes, reverse=True) or [1]


def random_cores(numel: int, tensor_rank: int, std: float, generator=None, zero_last: bool = False) -> list[torch.Tensor]:
    """Gaussian cores whose contraction has entries of roughly `std` (LoRETTA's init); `zero_last` makes the matrix
    exactly zero, for training from a no-op start."""
    modes = mode_shape(numel)
    ranks = [1] + [tensor_rank] * (len(modes) - 1) + [1]
    per_core = std ** (1 / len(modes))
    cores = [torch.randn(ranks[k], n, ranks[k + 1], generator=generator) / math.sqrt(ranks[k + 1]) * per_core
             for k, n in enumerate(modes)]
    if zero_last:
        cores[-1].zero_()
    return cores
