"""The device-side token grouping of one bucket for one step: tokens sorted by table row, cut into tiles.

`batch_plan` groups tokens on the host, which costs a device sync per step. Here everything is a device op with
shapes fixed by (T, R, block_m) alone (argsort, scatter_add, cumsum, searchsorted; no `.item()`, no data-dependent
Python branch), so it runs inside torch.compile and CUDA-graph capture, and one `Segments` serves every kernel of
the step.

A tile is at most `block_m` consecutive tokens of one row: the unit of work of every kernel (one program per tile
and output block). Their number is data-dependent, but bounded: sum_r ceil(n_r / M) <= (T + k (M - 1)) / M with k the
number of non-empty rows, k <= min(R, T). Kernels are launched over that bound and the unused tiles (row -1) exit at
once, which wastes far fewer programs than a grid of R * ceil(T / M) (one M-block column per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK_M = 16  # tl.dot needs M >= 16; decode batches rarely put more tokens on one adapter


@dataclass(frozen=True)
class Segments:
    token_order: torch.Tensor   # [T] int32 token indices sorted by row (stable); tokens outside the bucket last
    row_count: torch.Tensor     # [R] int32 tokens of each table row
    row_start: torch.Tensor     # [R] int32 where each row's tokens start in token_order
    tiles: torch.Tensor         # [max_tiles, 3] int32 (row, begin, end), begin/end in token_order; row -1: unused
    num_rows: int               # R: the bucket's table rows (static)
    block_m: int                # M: tokens per tile

    @property
    def num_tokens(self) -> int:
        return self.token_order.shape[0]

    @property
    def max_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_order.device


def max_tiles(num_tokens: int, num_rows: int, block_m: int) -> int:
    """The bound on the number of tiles (see the module docstring); a static launch size."""
    busy_rows = min(num_rows, num_tokens)
    return (num_tokens + busy_rows * (block_m - 1)) // block_m


def segments_of(row_of_token: torch.Tensor, num_rows: int, block_m: int = DEFAULT_BLOCK_M) -> Segments:
    """Group tokens by table row. row_of_token [T] int: the bucket row each token uses, -1 where the bucket does not
    apply (base tokens, other buckets); rows must be < num_rows. block_m: tokens per tile, >= 16 for the Triton
    kernels (tl.dot's smallest M)."""
    if num_rows < 1:
        raise ValueError("a bucket has at least one table row")
    device, num_tokens = row_of_token.device, row_of_token.shape[0]
    rows = row_of_token.to(torch.int64)
    key = torch.where(rows < 0, num_rows, rows)  # outsiders sort after every real row and are counted in bin R
    token_order = torch.argsort(key, stable=True).to(torch.int32)
    # scatter_add rather than bincount: bincount sizes its output from the data, a device sync on CUDA
    counts = torch.zeros(num_rows + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    row_count = counts[:num_rows]
    row_start = torch.cumsum(row_count, 0) - row_count

    tiles_of_row = (row_count + block_m - 1) // block_m
    tiles_through_row = torch.cumsum(tiles_of_row, 0)  # inclusive: tiles of rows 0..r
    tile = torch.arange(max_tiles(num_tokens, num_rows, block_m), device=device)
    tile_row = torch.searchsorted(tiles_through_row, tile, right=True)  # == R past the last tile
    used = tile_row < num_rows
    r = tile_row.clamp(max=num_rows - 1)
    first_tile = tiles_through_row[r] - tiles_of_row[r]
    begin = row_start[r] + (tile - first_tile) * block_m
    end = torch.minimum(begin + block_m, row_start[r] + row_count[r])
    tiles = torch.stack([torch.where(used, tile_row, -1), torch.where(used, begin, 0), torch.where(used, end, 0)], 1)
    return Segments(token_order, row_count.to(torch.int32), row_start.to(torch.int32),
                    tiles.to(torch.int32), num_rows, block_m)


def rows_for_bucket(slot_of_token: torch.Tensor, bucket_of_slot: torch.Tensor, row_of_slot: torch.Tensor,
                    bucket: int) -> torch.Tensor:
    """row_of_token for one bucket from vLLM's per-token slot index (-1: no adapter) and the slot tables
    (slot -> bucket id, -1 for empty slots; slot -> row); all on the device, no sync."""
    slot = slot_of_token.to(torch.int64)
    safe = slot.clamp(min=0)
    mine = (slot >= 0) & (bucket_of_slot.to(slot.device)[safe] == bucket)
    return torch.where(mine, row_of_slot.to(slot.device)[safe].to(torch.int64), -1)
