"""tenfold's CPU kernels for LoRETTA adp's bottleneck adapters (`tenfold.kernels.cpu.bottleneck_apply`, `bottleneck_pre`)
against the formula in float64 with transformers' activations: a_m(x) = [act(x W_down + b_down), 1] W_up' per token with
its adapter's row. Every dtype pair, bottleneck and model widths off the vector width, runs of one adapter longer than a
work item, the post-adapter reading the output it updates, the pre-adapters' input copy and difference with one or two
modules, rows below 0 skipped, and everything outside the bucket's tokens left bit for bit; native and portable (no
AVX-512) builds."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from tenfold.kernels import cpu
from test_cpu_kernels import _bucket_tokens, _close, _layer_output, _untouched, kernels  # noqa: F401 (fixture)


def _tables(rows_of_table, b, d_in, d_out, dtype, g):
    return ((torch.randn(rows_of_table, b, d_in, generator=g) * 0.1).to(dtype),
            (torch.randn(rows_of_table, b, generator=g) * 0.5).to(dtype),
            (torch.randn(rows_of_table, b + 1, d_out, generator=g) * 0.1).to(dtype))


def _adapter(x, tokens, rows, tables, activation):
    """a(x) per bucket token in float64, the formula written out."""
    wd_t, bd, wu = (t.double() for t in tables)
    out = []
    for token, row in zip(tokens.tolist(), rows.tolist()):
        h = ACT2FN[activation](wd_t[row] @ x[token].double() + bd[row])
        out.append(torch.cat([h, h.new_ones(1)]) @ wu[row])
    return torch.stack(out)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,b", [(576, 64), (100, 7), (40, 33)])
def test_post_adapter_matches_the_formula(kernels, x_dtype, table_dtype, d, b):
    g = torch.Generator().manual_seed(d + b)
    num_tokens, rows_of_table = 29, 5
    tokens, rows = _bucket_tokens(num_tokens, rows_of_table, g)
    tables = _tables(rows_of_table, b, d, d, table_dtype, g)
    wide, (out,) = _layer_output(num_tokens, [d], x_dtype, g)
    before = wide.clone()
    expected = out.double().clone()
    expected[tokens] += _adapter(out, tokens, rows, tables, "relu")
    # the post-adapter's input is the layer's output itself, updated in place
    kernels.bottleneck_apply(out, tokens, rows, [tables[0]], [tables[1]], [tables[2]], "relu", [out])
    _close(out, expected, x_dtype)
    _untouched(wide, before, tokens, [out])


@pytest.mark.parametrize("activation", sorted(cpu.BOTTLENECK_ACTIVATIONS))
def test_every_activation_is_transformers_own(kernels, activation):
    g = torch.Generator().manual_seed(7)
    tokens, rows = _bucket_tokens(13, 3, g)
    x = torch.randn(13, 48, generator=g) * 2
    tables = _tables(3, 20, 48, 24, torch.float32, g)
    out = torch.randn(13, 24, generator=g)
    expected = out.double().clone()
    expected[tokens] += _adapter(x, tokens, rows, tables, activation)
    kernels.bottleneck_apply(x, tokens, rows, [tables[0]], [tables[1]], [tables[2]], activation, [out])
    _close(out, expected, torch.float32)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("difference_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("modules", [1, 2])
def test_pre_adapters_give_the_input_and_the_difference(kernels, x_dtype, table_dtype, difference_dtype, modules):
    g = torch.Generator().manual_seed(modules * 10 + (x_dtype == torch.bfloat16))
    num_tokens, rows_of_table, d, b = 29, 5, 136, 24
    tokens, rows = _bucket_tokens(num_tokens, rows_of_table, g)
    x = torch.randn(num_tokens, d, generator=g).to(x_dtype)
    tables = [_tables(rows_of_table, b, d, d, table_dtype, g) for _ in range(modules)]
    inputs = x.clone()
    difference = torch.full((num_tokens, d), 3.0, dtype=difference_dtype)  # rows outside the bucket keep it
    kernels.bottleneck_pre(x, tokens, rows, *[[t[i] for t in tables] for i in range(3)], "tanh", inputs, difference)
    carrier = _adapter(x, tokens, rows, tables[0], "tanh")
    other = _adapter(x, tokens, rows, tables[1], "tanh") if modules == 2 else torch.zeros_like(carrier)
    expected_inputs = x.double().clone()
    expected_inputs[tokens] += carrier
    _close(inputs, expected_inputs, x_dtype)
    expected_difference = torch.full((num_tokens, d), 3.0, dtype=torch.float64)
    expected_difference[tokens] = other - carrier
    _close(difference, expected_difference, difference_dtype)
    outside = torch.ones(num_tokens, dtype=torch.bool)
    outside[tokens] = False
    assert torch.equal(inputs[outside], x[outside])


def test_bottleneck_skips_tokens_without_a_row_and_refuses_bad_input():
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(3, 32, generator=g), torch.zeros(3, 32)
    wd_t, bd, wu = _tables(2, 4, 32, 32, torch.float32, g)
    cpu.bottleneck_apply(x, torch.tensor([0, 2]), torch.tensor([-1, -1]), [wd_t], [bd], [wu], "relu", [out])
    assert torch.equal(out, torch.zeros(3, 32)), "a row below 0 (no adapter) adds nothing"
    with pytest.raises(RuntimeError, match="token 3 of 3"):
        cpu.bottleneck_apply(x, torch.tensor([3]), torch.tensor([0]), [wd_t], [bd], [wu], "relu", [out])
    with pytest.raises(RuntimeError, match="table row 2 of a table with 2 rows"):
        cpu.bottleneck_apply(x, torch.tensor([0]), torch.tensor([2]), [wd_t], [bd], [wu], "relu", [out])
    with pytest.raises(RuntimeError, match="activation quick_gelu is not one of"):
        cpu.bottleneck_apply(x, torch.tensor([0]), torch.tensor([0]), [wd_t], [bd], [wu], "quick_gelu", [out])
    with pytest.raises(RuntimeError, match="b \\+ 1"):
        cpu.bottleneck_apply(x, torch.tensor([0]), torch.tensor([0]), [wd_t], [bd], [wu[:, :4]], "relu", [out])
    with pytest.raises(RuntimeError, match="inputs: \\[T, d\\] like x"):
        cpu.bottleneck_pre(x, torch.tensor([0]), torch.tensor([0]), [wd_t], [bd], [wu], "relu", out[:2],
                           torch.zeros(3, 32))
    with pytest.raises(RuntimeError, match="the carrier module"):
        cpu.bottleneck_pre(x, torch.tensor([0]), torch.tensor([0]), [wd_t] * 3, [bd] * 3, [wu] * 3, "relu",
                           x.clone(), torch.zeros(3, 32))
