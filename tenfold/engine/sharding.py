"""Which part of each linear layer one tensor-parallel rank holds, as vLLM shards a Llama-style model.

Column-parallel (q, k, v, gate, up): each rank computes a contiguous range of the output columns (q: num_heads / tp
heads, k and v: num_kv_heads / tp heads, gate and up: intermediate / tp columns) from the whole, replicated input.
Row-parallel (o, down): each rank reads a contiguous range of the input columns and computes a partial output that
vLLM's all-reduce sums.

The native path shards every family's factors the same way (see each bucket's `row_tensors`): column-parallel
modules keep the expand factors of their own output columns, row-parallel modules the shrink factors of their own
input columns, and a row-parallel delta computed from a rank's input columns is a partial sum that joins the layer's
existing all-reduce. Families whose factors tile the weight in r x r blocks (MiSS, Bat) need shard boundaries on
multiples of r; this is checked when an adapter takes a slot, with an error that says which module and widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import AdapterMismatchError, ModelSpec

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True)
class Shard:
    spec: ModelSpec
    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size}")
        spec, tp = self.spec, self.size
        for what, count in (("num_heads", spec.num_heads), ("num_kv_heads", spec.num_kv_heads),
                            ("intermediate_size", spec.intermediate_size)):
            if count % tp:
                raise ValueError(f"tenfold's native mode shards {what}={count} evenly over tensor_parallel_size={tp}; "
                                 f"it does not divide (serve with a tensor-parallel size that divides it)")

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def out_range(self, module: str) -> slice:
        """The output columns of `module` this rank computes (all of them for row-parallel modules)."""
        fan_out = self.spec.module_shape(module)[1]
        return self._part(fan_out) if module in COLUMN_PARALLEL else slice(0, fan_out)

    def in_range(self, module: str) -> slice:
        """The input columns of `module` this rank reads (all of them for column-parallel modules)."""
        fan_in = self.spec.module_shape(module)[0]
        return self._part(fan_in) if module in ROW_PARALLEL else slice(0, fan_in)

    def weight_shape(self, module: str) -> tuple[int, int]:
        """[out, in] of this rank's part of the module's weight."""
        out, inputs = self.out_range(module), self.in_range(module)
        return out.stop - out.start, inputs.stop - inputs.start

    def heads_out(self, module: str) -> slice:
        """The heads of `module`'s output this rank computes (q: query heads, k/v: key/value heads, o: hidden)."""
        return _heads(self.out_range(module), self.spec.head_dim)

    def heads_in(self, module: str) -> slice:
        """The heads of `module`'s input this rank reads (o: attention heads; q/k/v: the hidden state's blocks)."""
        return _heads(self.in_range(module), self.spec.head_dim)

    def require_blocks(self, module: str, r: int, family: str, context: str, sides=("input", "output")) -> None:
        """Refuse a block family whose width-r blocks along `sides` of the module would straddle this rank's shard
        boundaries (an unsharded side is never refused: the family's own validation covers it)."""
        fan_in, fan_out = self.spec.module_shape(module)
        for side, part, full in (("input", self.in_range(module), fan_in), ("output", self.out_range(module), fan_out)):
            if side not in sides or part.stop - part.start == full:
                continue
            if part.start % r or (part.stop - part.start) % r:
                raise AdapterMismatchError(
                    f"{context}: {family} blocks of r={r} straddle the tensor-parallel shard of {module}'s {side} "
                    f"(columns {part.start}-{part.stop} of rank {self.rank}/{self.size}); serve it with a "
                    f"tensor-parallel size for which r divides every shard")

    def _part(self, width: int) -> slice:
        step = width // self.size
        return slice(self.rank * step, (self.rank + 1) * step)


def _heads(columns: slice, head_dim: int) -> slice:
    return slice(columns.start // head_dim, columns.stop // head_dim)
