"""tenfold's CPU kernels for LoRTA against the formula in float64. heads_out (`tenfold.kernels.cpu.lorta_apply`): per
token u = A x, then every output head h of every module gains (u * w[h]) B, w the head weights of one layer (a
strided view of the bucket's [R, L, heads, r] table). heads_in (`lorta_in_apply`): u = A_in x (the sum over the
input's heads as one matrix), then every module gains (u * c_lm[layer, m]) A^T_m. Every dtype pair, head widths and
ranks off the vector width, runs of one adapter longer than a work item, several modules' column slices of one
output, rows below 0 skipped, and everything outside the bucket's tokens and the modules' columns left bit for bit;
native and portable (no AVX-512) builds."""

from __future__ import annotations

import pytest
import torch

from tenfold.kernels import cpu
from test_cpu_kernels import _bucket_tokens, _close, _layer_output, _untouched, kernels  # noqa: F401 (fixture)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in,rank,head_dim,heads", [(576, 16, 64, [15, 9]), (100, 5, 24, [3]), (64, 33, 40, [2, 1])])
def test_lorta_matches_the_formula(kernels, x_dtype, table_dtype, fan_in, rank, head_dim, heads):
    g = torch.Generator().manual_seed(fan_in + rank)
    num_tokens, rows_of_table, layers, layer = 29, 5, 3, 1
    tokens, rows = _bucket_tokens(num_tokens, rows_of_table, g)
    x = torch.randn(num_tokens, fan_in, generator=g).to(x_dtype)
    a_t = (torch.randn(rows_of_table, rank, fan_in, generator=g) * 0.1).to(table_dtype)
    b = (torch.randn(rows_of_table, rank, head_dim, generator=g) * 0.1).to(table_dtype)
    weights = [torch.randn(rows_of_table, layers, h, rank, generator=g).to(table_dtype) for h in heads]
    wide, outs = _layer_output(num_tokens, [h * head_dim for h in heads], x_dtype, g)
    before = wide.clone()
    expected = [o.double().clone() for o in outs]
    for token, row in zip(tokens.tolist(), rows.tolist()):
        u = a_t[row].double() @ x[token].double()
        for m, w in enumerate(weights):
            expected[m][token] += ((u[None, :] * w[row, layer].double()) @ b[row].double()).reshape(-1)
    kernels.lorta_apply(x, tokens, rows, a_t, b, [w[:, layer] for w in weights], outs)
    for m in range(len(heads)):
        _close(outs[m], expected[m], x_dtype)
    _untouched(wide, before, tokens, outs)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim,rank,widths", [(9, 64, 16, [576, 192, 192]), (3, 24, 5, [72]),
                                                        (2, 20, 33, [40, 8])])
def test_lorta_heads_in_matches_the_formula(kernels, x_dtype, table_dtype, heads, head_dim, rank, widths):
    g = torch.Generator().manual_seed(heads * 100 + rank)
    num_tokens, rows_of_table, layers, layer = 29, 5, 3, 2
    tokens, rows = _bucket_tokens(num_tokens, rows_of_table, g)
    x = torch.randn(num_tokens, heads * head_dim, generator=g).to(x_dtype)
    b_t = torch.randn(rows_of_table, head_dim, rank, generator=g, dtype=torch.float64) * 0.1
    c_h = torch.randn(rows_of_table, heads, rank, generator=g, dtype=torch.float64)
    # the bucket's A_in [r, in]: C_h[h, k] * B^T[c, k] at column h * d_h + c
    a_in = (c_h[:, :, None, :] * b_t[:, None]).reshape(rows_of_table, -1, rank).transpose(1, 2)
    probe = torch.randn(heads * head_dim, dtype=torch.float64, generator=g)
    heads_sum = (c_h[0] * (probe.reshape(heads, head_dim) @ b_t[0])).sum(0)  # sum_h C_h[h] * (B x_h)
    torch.testing.assert_close(a_in[0] @ probe, heads_sum)
    a_in = a_in.contiguous().to(table_dtype)
    c_lm = torch.randn(rows_of_table, layers, 4, rank, generator=g).to(table_dtype)
    a_t = [(torch.randn(rows_of_table, rank, w, generator=g) * 0.1).to(table_dtype) for w in widths]
    wide, outs = _layer_output(num_tokens, widths, x_dtype, g)
    before = wide.clone()
    expected = [o.double().clone() for o in outs]
    for token, row in zip(tokens.tolist(), rows.tolist()):
        u = a_in[row].double() @ x[token].double()
        for m in range(len(widths)):
            expected[m][token] += (u * c_lm[row, layer, m].double()) @ a_t[m][row].double()
    kernels.lorta_in_apply(x, tokens, rows, a_in, [c_lm[:, layer, m] for m in range(len(widths))], a_t, outs)
    for m in range(len(widths)):
        _close(outs[m], expected[m], x_dtype)
    _untouched(wide, before, tokens, outs)


def test_lorta_heads_in_refuses_bad_input():
    x, out = torch.randn(3, 32), torch.zeros(3, 8)
    a_in, w, a_t = torch.randn(2, 4, 32), torch.randn(2, 4), torch.randn(2, 4, 8)
    cpu.lorta_in_apply(x, torch.tensor([0, 2]), torch.tensor([-1, -1]), a_in, [w], [a_t], [out])
    assert torch.equal(out, torch.zeros(3, 8)), "a row below 0 (no adapter) adds nothing"
    with pytest.raises(RuntimeError, match="table row 2 of a table with 2 rows"):
        cpu.lorta_in_apply(x, torch.tensor([0]), torch.tensor([2]), a_in, [w], [a_t], [out])
    with pytest.raises(RuntimeError, match="a_in: \\[R, r, in\\] matching x"):
        cpu.lorta_in_apply(x, torch.tensor([0]), torch.tensor([0]), a_in[:, :, :16], [w], [a_t], [out])
    with pytest.raises(RuntimeError, match="out: \\[T, out\\]"):
        cpu.lorta_in_apply(x, torch.tensor([0]), torch.tensor([0]), a_in, [w], [a_t], [out[:, :4]])


def test_lorta_skips_tokens_without_a_row_and_refuses_bad_input():
    x, out = torch.randn(3, 32), torch.zeros(3, 2 * 8)
    a_t, b, w = torch.randn(2, 4, 32), torch.randn(2, 4, 8), torch.randn(2, 2, 4)
    cpu.lorta_apply(x, torch.tensor([0, 2]), torch.tensor([-1, -1]), a_t, b, [w], [out])
    assert torch.equal(out, torch.zeros(3, 16)), "a row below 0 (no adapter) adds nothing"
    with pytest.raises(RuntimeError, match="token 3 of 3"):
        cpu.lorta_apply(x, torch.tensor([3]), torch.tensor([0]), a_t, b, [w], [out])
    with pytest.raises(RuntimeError, match="table row 2 of a table with 2 rows"):
        cpu.lorta_apply(x, torch.tensor([0]), torch.tensor([2]), a_t, b, [w], [out])
    with pytest.raises(RuntimeError, match="heads \\* d_h"):
        cpu.lorta_apply(x, torch.tensor([0]), torch.tensor([0]), a_t, b, [w], [out[:, :8]])
