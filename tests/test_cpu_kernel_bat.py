"""tenfold's CPU kernel for Bat (`tenfold.kernels.cpu.bat_apply`) against the update materialized in float64: for
W0 cut into r x r blocks, delta W_ij = W0_ij D_i + D_i (D_i: the adapter's block of output block i), y = x delta W^T.
The kernel never materializes delta W; it transforms the inputs per output block and makes a second pass over W0^T.
Block sizes with and without intrinsics (16, 32, 64; 8 and 24 take the portable loops), every dtype pair, several
modules writing their column slices of one output, runs of one adapter longer than a tile, and everything outside
the bucket's tokens and the modules' columns left bit for bit; with the native and the portable (no AVX-512) build."""

from __future__ import annotations

import pytest
import torch

from tenfold.kernels import cpu
from tenfold.kernels.bat import bat_table
from test_cpu_kernels import _bucket_tokens, _close, _layer_output, _untouched, kernels  # noqa: F401 (fixture)


def _delta_weight(d: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """D [out/r, r, r], W0 [out, in] -> delta W [out, in] in float64, block by block."""
    out_blocks, r, _ = d.shape
    delta = torch.empty(w0.shape, dtype=torch.float64)
    for i in range(out_blocks):
        for j in range(w0.shape[1] // r):
            w_ij = w0[i * r:(i + 1) * r, j * r:(j + 1) * r].double()
            delta[i * r:(i + 1) * r, j * r:(j + 1) * r] = w_ij @ d[i].double() + d[i].double()
    return delta


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,fan_in,widths", [(16, 96, [96, 32]), (32, 64, [64]), (64, 128, [192, 64]),
                                                (8, 40, [24, 16]), (24, 48, [72])])
def test_bat_matches_the_materialized_update(kernels, x_dtype, table_dtype, rank, fan_in, widths):
    g = torch.Generator().manual_seed(rank * 1000 + fan_in)
    num_tokens, rows_of_table = 37, 6
    tokens, rows = _bucket_tokens(num_tokens, rows_of_table, g)
    x = torch.randn(num_tokens, fan_in, generator=g).to(x_dtype)
    blocks = [torch.randn(rows_of_table, w // rank, rank, rank, generator=g) * 0.2 for w in widths]  # D per row
    w0 = [(torch.randn(w, fan_in, generator=g) * 0.1).to(table_dtype) for w in widths]
    tables = [torch.stack([bat_table(d) for d in per_row]).to(table_dtype) for per_row in blocks]
    wide, outs = _layer_output(num_tokens, widths, x_dtype, g)
    before = wide.clone()
    expected = [o.double().clone() for o in outs]
    for m, width in enumerate(widths):
        # the reference reads the same rounded tables the kernel reads: D back from its table, W0 as given
        d_rounded = tables[m].double().view(rows_of_table, rank, width // rank, rank).permute(0, 2, 3, 1)
        for row in range(rows_of_table):
            chosen = tokens[rows == row]
            if chosen.numel():
                delta = _delta_weight(d_rounded[row], w0[m])
                expected[m][chosen] += x[chosen].double() @ delta.t()
    kernels.bat_apply(x, tokens, rows, tables, [w.t().contiguous() for w in w0], outs)
    for m in range(len(widths)):
        _close(outs[m], expected[m], x_dtype)
    _untouched(wide, before, tokens, outs)


def test_bat_skips_tokens_without_a_row_and_refuses_bad_input():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, generator=g)
    table = torch.randn(2, 16, 32, generator=g)
    w0t = torch.randn(32, 32, generator=g)
    out = torch.zeros(4, 32)
    cpu.bat_apply(x, torch.tensor([0, 1]), torch.tensor([-1, -1]), [table], [w0t], [out])
    assert torch.equal(out, torch.zeros(4, 32)), "a row below 0 (no adapter) adds nothing"
    with pytest.raises(RuntimeError, match="token 4 of 4"):
        cpu.bat_apply(x, torch.tensor([4]), torch.tensor([0]), [table], [w0t], [out])
    with pytest.raises(RuntimeError, match="table row 2 of a table with 2 rows"):
        cpu.bat_apply(x, torch.tensor([0]), torch.tensor([2]), [table], [w0t], [out])
    with pytest.raises(RuntimeError, match="not a multiple of the block size"):
        cpu.bat_apply(x[:, :24], torch.tensor([0]), torch.tensor([0]), [table], [w0t[:24]], [out])
    with pytest.raises(RuntimeError, match="W0\\^T"):
        cpu.bat_apply(x, torch.tensor([0]), torch.tensor([0]), [table], [w0t.t()], [out])
