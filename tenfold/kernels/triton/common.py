"""Pieces every segmented kernel shares: reading a tile, summing shrink partials, adding into the output, the
activations, and the host-side launch sizes.

Conventions of all kernels here: one program per (tile, block of the work axis); a tile is up to BLOCK_M tokens of
one table row (`tenfold.kernels.segments`); programs of unused tiles return at once. Products run on tensor cores
through tl.dot, whose operands must be at least 16 wide, so every small axis (rank, head_dim, Bat's block) is padded
to a power of two >= 16 with masked loads. Accumulation is fp32; the output is read, added to in fp32 and written
back only where a live token meets a real column, so every other element of the output keeps its bits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import LaunchConfig


def padded(n: int) -> int:
    """A block covering n: a power of two, at least 16 (tl.dot's smallest operand)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tables get exact fp32 products (what torch computes by default); tf32 would lose 13 mantissa bits.
    The setting is ignored for 16-bit operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_splits(device: torch.device, num_tiles: int, steps: int, config: LaunchConfig) -> int:
    """How many programs share one tile's reduction (split-K). A decode step has few tiles, and a reduction over 4096
    inputs in one program per tile would leave most of the GPU idle; splitting costs a few partial rows in u."""
    if config.splits is not None:
        return max(1, min(config.splits, steps))
    programs_wanted = 2 * (_multiprocessors(device.index or 0) if device.type == "cuda" else 4)
    return max(1, min(steps, 16, programs_wanted // max(num_tiles, 1)))


def shrunk_buffer(splits: int, num_tokens: int, rank: int, device: torch.device) -> torch.Tensor:
    """u [splits, T, rank] fp32: every split writes its own partial sums (no atomics, no zero fill); rows of
    tokens outside the bucket are never written."""
    return torch.empty((splits, num_tokens, rank), dtype=torch.float32, device=device)


def unit_stride_rows(table: torch.Tensor) -> torch.Tensor:
    """Vectors indexed by row (biases, scalings) are read with a unit stride along their last axis."""
    return table if table.stride(-1) == 1 else table.contiguous()


# -- device helpers ------------------------------------------------------------------------------------------------

@triton.jit
def lanes(count, BLOCK: tl.constexpr):
    """The offsets 0..BLOCK-1 of an axis padded to BLOCK, and which of them are real (< count)."""
    offsets = tl.arange(0, BLOCK)
    return offsets, offsets < count


@triton.jit
def tile_tokens(tiles_ptr, order_ptr, tile, BLOCK_M: tl.constexpr):
    """(table row, token indices [BLOCK_M] int64, live [BLOCK_M]) of one tile; the row is -1 for an unused tile."""
    row = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    begin = tl.load(tiles_ptr + 3 * tile + 1)
    end = tl.load(tiles_ptr + 3 * tile + 2)
    slots = begin + tl.arange(0, BLOCK_M)
    live = slots < end
    tokens = tl.load(order_ptr + slots, mask=live, other=0).to(tl.int64)  # int64: T * width may pass 2**31
    return row, tokens, live


@triton.jit
def load_shrunk(u_ptr, tokens, live, r, in_rank, stride_us, stride_ut, stride_un, SPLITS: tl.constexpr):
    """The shrink of a tile's tokens [BLOCK_M, BLOCK_R] fp32: the sum of its SPLITS partials."""
    ptrs = u_ptr + tokens[:, None] * stride_ut + r[None, :] * stride_un
    mask = live[:, None] & in_rank[None, :]
    u = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLITS):
        u += tl.load(ptrs + s * stride_us, mask=mask, other=0.0)
    return u


@triton.jit
def store_shrunk(u_ptr, split, tokens, live, r, in_rank, stride_us, stride_ut, stride_un, acc):
    tl.store(u_ptr + split * stride_us + tokens[:, None] * stride_ut + r[None, :] * stride_un, acc,
             mask=live[:, None] & in_rank[None, :])


@triton.jit
def accumulate(out_ptr, tokens, cols, stride_ot, stride_oc, delta, mask):
    """output[tokens, cols] += delta (fp32), only where mask holds: no other element is read back or written."""
    ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_oc
    previous = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (previous.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


# The activations the bottleneck kernel computes in its prologue (transformers' ACT2FN names); others, the reference op.
ACTIVATIONS = {"linear": 0, "relu": 1, "silu": 2, "swish": 2, "gelu": 3, "gelu_new": 4, "gelu_pytorch_tanh": 4,
               "gelu_fast": 4, "tanh": 5, "sigmoid": 6, "quick_gelu": 7}


@triton.jit
def _tanh(h):
    return 2.0 * tl.sigmoid(2.0 * h) - 1.0


@triton.jit
def activate(h, ACT: tl.constexpr):
    if ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = h * tl.sigmoid(h)
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 4:  # the tanh approximation of gelu
        h = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACT == 5:
        h = _tanh(h)
    elif ACT == 6:
        h = tl.sigmoid(h)
    elif ACT == 7:
        h = h * tl.sigmoid(1.702 * h)
    return h
