"""The reference ops' view of a `Segments`: its tiles as padded chunks [n_tiles, M], so the existing padded torch ops
(`tenfold.kernels.lowrank` & co., one batched matmul per bucket and module) serve as the reference ops unchanged.

Built from the same tile table as the kernels, on the device and without a sync; unused tiles and the padding slots
of partial tiles compute on token 0 and table row 0 and are dropped when the results are written back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..segments import Segments


@dataclass(frozen=True)
class TileLayout:
    tokens: torch.Tensor  # [n_tiles, M] int64 token of each slot (0 where not live)
    live: torch.Tensor    # [n_tiles, M] bool: the slot holds a token of the tile
    rows: torch.Tensor    # [n_tiles] int64 table row of each tile (0 for unused tiles)
    num_tokens: int

    def gather(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token rows [T, k] -> [n_tiles, M, k] in dtype."""
        return x[self.tokens].to(dtype)

    def table(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of a bucket table [R, ...] -> [n_tiles, ...], one row per tile (not per token)."""
        return table[self.rows]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[n_tiles, M, k] -> [T, k] fp32, each live slot's values on its token's row, zeros elsewhere."""
        flat = values.reshape(-1, values.shape[-1]).float()
        rows = flat.new_zeros(self.num_tokens + 1, flat.shape[1]).index_copy_(0, self._destination(), flat)
        return rows[: self.num_tokens]

    def accumulate(self, output: torch.Tensor, delta: torch.Tensor) -> None:
        """output [T, out] += delta [n_tiles, M, out] on the tiles' tokens, in fp32; other rows keep their bits."""
        touched = torch.zeros(self.num_tokens + 1, dtype=torch.bool, device=output.device)
        touched = touched.index_fill_(0, self._destination(), True)[: self.num_tokens, None]
        output.copy_(torch.where(touched, (output.float() + self.scatter(delta)).to(output.dtype), output))

    def _destination(self) -> torch.Tensor:
        """The token row of every slot, dead slots sent to a spare row T (no boolean indexing: it would sync)."""
        return torch.where(self.live, self.tokens, self.num_tokens).reshape(-1)


def tile_layout(seg: Segments) -> TileLayout:
    row, begin, end = seg.tiles.to(torch.int64).unbind(1)
    slot = begin[:, None] + torch.arange(seg.block_m, device=seg.device)
    live = slot < end[:, None]
    tokens = torch.where(live, seg.token_order.to(torch.int64)[slot.clamp(max=max(seg.num_tokens - 1, 0))], 0)
    return TileLayout(tokens, live, row.clamp(min=0), seg.num_tokens)
