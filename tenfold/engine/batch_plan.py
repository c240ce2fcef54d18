"""One step's token grouping for the native path: which tokens use which bucket, in which chunk and row.

Built once per step from vLLM's per-token slot index (-1 = base model) and reused by every layer. The tokens of a
bucket are sorted by table row and cut into C chunks of G rows (one adapter per chunk, large groups split so one
popular adapter does not pad every other chunk to its size); padding rows repeat the chunk's first token. The ops
then run one batched matmul per bucket and module, whatever the number of adapters, and base rows are never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class BucketGroup:
    tokens: torch.Tensor      # [n] the bucket's tokens, in chunk order
    positions: torch.Tensor   # [n] each token's row in the flattened [C * G] layout
    padded: torch.Tensor      # [C * G] token index of every padded row
    chunk_rows: torch.Tensor  # [C] the bucket's table row used by each chunk
    row_range: slice | None   # chunk_rows as a slice when they are consecutive (tables then need no gather)
    chunk_size: int           # G
    token_rows: torch.Tensor  # [n] the table row of each token, in the order of `tokens`
    step_tokens: int          # T: every token of the step, the group's and the others
    padding: bool = True      # whether the layout has padding rows (positions is then not simply 0..n-1)
    # per-step cache of the bucket's table rows this group reads (see `Bucket.rows`): a group lives for one plan
    views: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device) -> "BucketGroup":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return BucketGroup(move(self.tokens), move(self.positions), move(self.padded), move(self.chunk_rows),
                           self.row_range, self.chunk_size, move(self.token_rows), self.step_tokens, self.padding)

    @property
    def dense(self) -> bool:
        """Whether the group holds at least half of the step's tokens: ops may then run over all T rows in token
        order (the other rows with exact zeros) instead of gathering and scattering the group's rows."""
        return 2 * self.tokens.numel() >= self.step_tokens

    def step_rows(self, zero_row: int) -> torch.Tensor:
        """[T] the table row of every token of the step in token order, kept for the step. Tokens outside the group
        read `zero_row`, a row of zeros that no adapter is written into (`Bucket.zero_row`), never some adapter's
        row under a zero weight: 0 * NaN is NaN, and another tenant's NaN would reach their outputs."""
        found = self.views.get("step_rows")
        if found is None:
            found = self.token_rows.new_full((self.step_tokens,), zero_row).index_copy_(0, self.tokens, self.token_rows)
            self.views["step_rows"] = found
        return found

    def in_token_order(self, padded: torch.Tensor) -> torch.Tensor:
        """Padded [C, G, k] -> [T, k] in token order, exact zeros on the rows of tokens outside the group."""
        rows = self.real_rows(padded)
        return rows.new_zeros(self.step_tokens, rows.shape[-1]).index_copy_(0, self.tokens, rows)

    @property
    def num_chunks(self) -> int:
        return self.chunk_rows.numel()

    def rows_of(self, table: torch.Tensor) -> torch.Tensor:
        """Per-chunk rows of a bucket table: a view when the rows are consecutive, else a gather."""
        if self.row_range is not None:
            return table[self.row_range]
        return table.index_select(0, self.chunk_rows)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Token rows [T, k] -> padded [C, G, k]."""
        return x.index_select(0, self.padded).view(self.num_chunks, self.chunk_size, -1)

    def real_rows(self, padded: torch.Tensor) -> torch.Tensor:
        """Padded [C, G, ...] -> [n, ...], one row per token of the group in its token order (padding dropped)."""
        flat = padded.reshape(-1, *padded.shape[2:])
        return flat.index_select(0, self.positions) if self.padding else flat


def group_tokens(tokens: torch.Tensor, rows: torch.Tensor, step_tokens: int) -> BucketGroup:
    """Group one bucket's tokens (any order) by their table row; step_tokens: all tokens of the step."""
    order = torch.argsort(rows, stable=True)
    tokens, rows = tokens[order], rows[order]
    unique_rows, counts = torch.unique_consecutive(rows, return_counts=True)
    n, groups = tokens.numel(), unique_rows.numel()
    largest = int(counts.max())
    chunk_size = min(largest, max(4, 2 * math.ceil(n / groups)))
    chunks_per_group = (counts + chunk_size - 1) // chunk_size
    group_of_token = torch.repeat_interleave(torch.arange(groups), counts)
    group_start = torch.cumsum(counts, 0) - counts
    within = torch.arange(n) - group_start[group_of_token]
    first_chunk = torch.cumsum(chunks_per_group, 0) - chunks_per_group
    chunk_of_token = first_chunk[group_of_token] + within // chunk_size
    positions = chunk_of_token * chunk_size + within % chunk_size
    num_chunks = int(chunks_per_group.sum())
    first_token_of_chunk = torch.empty(num_chunks, dtype=torch.long)
    first_token_of_chunk[chunk_of_token.flip(0)] = tokens.flip(0)  # the last write wins: the chunk's first token
    padded = first_token_of_chunk.repeat_interleave(chunk_size)
    padded[positions] = tokens
    chunk_rows = torch.repeat_interleave(unique_rows, chunks_per_group)
    consecutive = num_chunks == 1 or bool((chunk_rows[1:] - chunk_rows[:-1] == 1).all())
    row_range = slice(int(chunk_rows[0]), int(chunk_rows[0]) + num_chunks) if consecutive else None
    return BucketGroup(tokens, positions, padded, chunk_rows, row_range, chunk_size, rows, step_tokens,
                       padding=n != padded.numel())


def plan_batch(slot_indices: torch.Tensor, bucket_of_slot: torch.Tensor, row_of_slot: torch.Tensor
               ) -> list[tuple[int, BucketGroup]]:
    """[(bucket id, group)] for one step; slot_indices [T] (-1: no adapter), the tables map slot -> bucket id (-1:
    empty or a warm-up dummy) and slot -> row."""
    indices = slot_indices.to("cpu", torch.long)
    bucket = torch.where(indices >= 0, bucket_of_slot[indices.clamp(min=0)], -1)
    if not bool((bucket >= 0).any()):
        return []
    plan = []
    for bucket_id in torch.unique(bucket[bucket >= 0]).tolist():
        tokens = (bucket == bucket_id).nonzero().squeeze(1)
        plan.append((bucket_id, group_tokens(tokens, row_of_slot[indices[tokens]], indices.numel())))
    return plan
