"""tenfold's C++ CPU kernels (`tenfold.kernels.cpu`) against the formula written out in float64: every dtype pair,
widths and ranks that are not multiples of the vector width, runs of one adapter longer than a work item, several
modules writing their column slices of one output, MiSS mini blocks repeating along the output, and the rows and
columns outside the bucket left untouched, bit for bit. Each test runs the build tenfold serves with (for this
machine's CPU) and a portable build without AVX-512, which is what CPUs without it run."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tenfold.kernels import cpu

# the portable path: this machine's CPU with AVX-512 turned off (the kernels' loops without intrinsics)
PORTABLE_FLAGS = ("-O3", "-march=native", "-mno-avx512f", "-fopenmp") if platform.machine() == "x86_64" else (
    "-O3", "-fopenmp")


@pytest.fixture(scope="module", params=["native", "portable"])
def kernels(request):
    if request.param == "native":
        return cpu.ops()
    return cpu.build("tenfold_cpu_portable", PORTABLE_FLAGS)


def _bucket_tokens(num_tokens: int, rows_of_table: int, generator: torch.Generator):
    """A random subset of the step's tokens with random table rows, sorted by row as the batch plan gives them
    (one row gets a run of 11 tokens, longer than a work item)."""
    members = torch.randperm(num_tokens, generator=generator)[: num_tokens * 3 // 4]
    rows = torch.randint(0, rows_of_table, (members.numel(),), generator=generator)
    rows[:11] = rows_of_table - 1
    order = torch.argsort(rows, stable=True)
    return members[order].contiguous(), rows[order].contiguous()


def _layer_output(num_tokens, widths, dtype, generator):
    """A layer output with the modules' columns side by side after 8 leading columns (and 8 trailing ones)."""
    wide = torch.randn(num_tokens, 8 + sum(widths) + 8, generator=generator).to(dtype)
    starts = [8 + sum(widths[:i]) for i in range(len(widths))]
    return wide, [wide[:, s: s + w] for s, w in zip(starts, widths)]


def _untouched(wide, before, tokens, slices):
    outside = torch.ones(wide.shape[0], dtype=torch.bool)
    outside[tokens] = False
    assert torch.equal(wide[outside], before[outside])  # base rows keep their bits
    covered = torch.zeros(wide.shape[1], dtype=torch.bool)
    for s in slices:
        covered[s.storage_offset() - wide.storage_offset(): s.storage_offset() - wide.storage_offset() + s.shape[1]] = True
    assert torch.equal(wide[:, ~covered], before[:, ~covered])


def _close(actual, expected, dtype):
    if dtype == torch.bfloat16:  # one rounding of an fp32 sum: within a bf16 ulp of the exact result
        torch.testing.assert_close(actual.double(), expected, rtol=2 ** -7, atol=1e-2)
    else:
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in,rank,widths", [(72, 5, [40, 24]), (576, 16, [192, 192, 64]), (130, 8, [300])])
def test_apply_matches_the_formula(kernels, x_dtype, table_dtype, fan_in, rank, widths):
    g = torch.Generator().manual_seed(fan_in * 31 + rank)
    num_tokens, table_rows = 37, 6
    x = torch.randn(num_tokens, fan_in, generator=g).to(x_dtype)
    a_t = [(torch.randn(table_rows, rank, fan_in, generator=g) / fan_in ** 0.5).to(table_dtype) for _ in widths]
    b = [torch.randn(table_rows, rank, w, generator=g).to(table_dtype) for w in widths]
    wide, outs = _layer_output(num_tokens, widths, x_dtype, g)
    before = wide.clone()
    tokens, rows = _bucket_tokens(num_tokens, table_rows, g)
    expected = []
    for a_m, b_m, out in zip(a_t, b, outs):
        h = torch.einsum("ni,nri->nr", x.double()[tokens], a_m.double()[rows])
        e = out.double().clone()
        e[tokens] += torch.einsum("nr,nro->no", h, b_m.double()[rows])
        expected.append(e)

    kernels.lowrank_apply(x, tokens, rows, a_t, b, outs)

    for out, e in zip(outs, expected):
        _close(out, e, x_dtype)
    _untouched(wide, before, tokens, outs)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("periods", [[16, 192], [24, 96], [64, 64]])
def test_expand_repeats_a_mini_block_along_the_output(kernels, out_dtype, periods):
    g = torch.Generator().manual_seed(sum(periods))
    num_tokens, rank, width = 20, 8, 192
    tokens, rows = _bucket_tokens(num_tokens, 3, g)
    h = torch.randn(tokens.numel(), rank, generator=g)
    d = [torch.randn(3, rank, p, generator=g).to(torch.bfloat16) for p in periods]
    wide, outs = _layer_output(num_tokens, [width] * len(periods), out_dtype, g)
    before = wide.clone()
    expected = []
    for d_m, out in zip(d, outs):
        e = out.double().clone()
        e[tokens] += torch.einsum("nr,nro->no", h.double(), d_m.double()[rows]).repeat(1, width // d_m.shape[2])
        expected.append(e)
    kernels.lowrank_expand(h, tokens, rows, d, outs)
    for out, e in zip(outs, expected):
        _close(out, e, out_dtype)
    _untouched(wide, before, tokens, outs)


def test_bad_indices_are_refused():  # through the wrappers the engine calls
    x, a_t, b, out = torch.randn(4, 32), torch.randn(2, 4, 32), torch.randn(2, 4, 8), torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="table row 2 of a table with 2 rows"):
        cpu.lowrank_apply(x, torch.tensor([0, 1]), torch.tensor([1, 2]), [a_t], [b], [out])
    with pytest.raises(RuntimeError, match="token 4 of 4"):
        cpu.lowrank_apply(x, torch.tensor([0, 4]), torch.tensor([1, 1]), [a_t], [b], [out])


def test_the_build_is_keyed_by_source_cpu_and_torch(monkeypatch):
    name = cpu.build_name()
    monkeypatch.setattr(cpu, "_cpu_features", lambda: "another cpu")
    assert cpu.build_name() != name


def _fake_compile(calls: list):
    def compile_into(private: Path) -> None:
        calls.append(private)
        (private / "lock").write_text("")  # torch's build lock, held while it compiles
        (private / "k.so").write_bytes(b"library")
        (private / "lock").unlink()
    return compile_into


def test_a_build_that_died_does_not_block_the_next_start(tmp_path):
    """A build killed mid-way (the older layout built in place and left torch's lock, on which every later start
    waited forever) is redone, published whole, and its leftovers are cleaned up."""
    directory = tmp_path / "tenfold_cpu_0123"
    directory.mkdir()
    (directory / "lock").write_text("")  # an older tenfold's build in place, killed: lock and no library
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".tenfold_cpu_0123.building.{dead.pid}.deadbeef"  # a private build whose process died
    abandoned.mkdir()
    (abandoned / "lock").write_text("")
    calls = []
    assert cpu.publish_build(directory, "k.so", _fake_compile(calls)) is True
    assert (directory / "k.so").read_bytes() == b"library" and not (directory / "lock").exists()
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tenfold_cpu_0123"]  # no private directory left
    assert cpu.publish_build(directory, "k.so", _fake_compile(calls)) is False  # built: loaded, not rebuilt
    assert len(calls) == 1


def test_a_failed_build_publishes_nothing(tmp_path):
    directory = tmp_path / "tenfold_cpu_0123"

    def broken(private: Path) -> None:
        (private / "half.o").write_bytes(b"")
        raise RuntimeError("compiler said no")

    with pytest.raises(RuntimeError, match="compiler said no"):
        cpu.publish_build(directory, "k.so", broken)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_first_builds_keep_the_first_published(tmp_path):
    directory = tmp_path / "tenfold_cpu_0123"

    def slower(private: Path) -> None:  # another process publishes while this one compiles
        _fake_compile([])(private)
        (private / "k.so").write_bytes(b"second")
        assert cpu.publish_build(directory, "k.so", _fake_compile([])) is True

    assert cpu.publish_build(directory, "k.so", slower) is True
    assert (directory / "k.so").read_bytes() == b"library"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tenfold_cpu_0123"]


def test_an_unknown_choice_is_refused(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "fast")
    with pytest.raises(ValueError, match="TENFOLD_CPU_KERNELS='fast'"):
        cpu.enabled()


# --- lowrank_shrink: the shrink alone (LoRETTA adp: bias and activation on h between the shrink and the expand) -----

@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in,rank", [(72, 5), (576, 64), (130, 8), (40, 65)])
def test_shrink_matches_the_formula(kernels, x_dtype, table_dtype, fan_in, rank):
    g = torch.Generator().manual_seed(fan_in * 7 + rank)
    num_tokens, table_rows = 37, 6
    x = torch.randn(num_tokens, fan_in, generator=g).to(x_dtype)
    a_t = [(torch.randn(table_rows, rank, fan_in, generator=g) / fan_in ** 0.5).to(table_dtype) for _ in range(2)]
    tokens, rows = _bucket_tokens(num_tokens, table_rows, g)
    rows[:3] = -1  # sorted still: rows below 0 are skipped, their h kept
    # each h a column slice of a wider buffer (rows with a stride), filled with a value the shrink must overwrite
    wide = torch.full((2, tokens.numel(), rank + 3), 7.0)
    h = [w[:, 1: rank + 1] for w in wide]
    before = wide.clone()

    kernels.lowrank_shrink(x, tokens, rows, a_t, h)

    kept = rows < 0
    for a_m, h_m in zip(a_t, h):
        expected = torch.einsum("ni,nri->nr", x.double()[tokens[~kept]], a_m.double()[rows[~kept]])
        _close(h_m[~kept], expected, torch.float32)  # fp32 sums of the stored values, whatever their dtype
    assert torch.equal(wide[:, kept], before[:, kept])
    assert torch.equal(wide[:, :, 0], before[:, :, 0]) and torch.equal(wide[:, :, -2:], before[:, :, -2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_then_expand_is_apply_bit_for_bit(kernels, dtype):
    g = torch.Generator().manual_seed(3)
    num_tokens, table_rows, fan_in, rank, widths = 29, 5, 96, 12, [48, 80]
    x = torch.randn(num_tokens, fan_in, generator=g).to(dtype)
    a_t = [torch.randn(table_rows, rank, fan_in, generator=g).to(dtype) for _ in widths]
    b = [torch.randn(table_rows, rank, w, generator=g).to(dtype) for w in widths]
    tokens, rows = _bucket_tokens(num_tokens, table_rows, g)
    applied, applied_outs = _layer_output(num_tokens, widths, dtype, g)
    split = applied.clone()
    split_outs = [split[:, 8 + sum(widths[:i]): 8 + sum(widths[: i + 1])] for i in range(len(widths))]

    kernels.lowrank_apply(x, tokens, rows, a_t, b, applied_outs)
    h = [torch.empty(tokens.numel(), rank) for _ in widths]
    kernels.lowrank_shrink(x, tokens, rows, a_t, h)
    for h_m, b_m, out in zip(h, b, split_outs):
        kernels.lowrank_expand(h_m, tokens, rows, [b_m], [out])

    assert torch.equal(split, applied)


def test_shrink_refuses_bad_indices_and_outputs():  # through the wrapper the engine calls
    x, a_t = torch.randn(4, 32), torch.randn(2, 4, 32)
    h = torch.empty(2, 4)
    with pytest.raises(RuntimeError, match="table row 2 of a table with 2 rows"):
        cpu.lowrank_shrink(x, torch.tensor([0, 1]), torch.tensor([1, 2]), [a_t], [h])
    with pytest.raises(RuntimeError, match="token 4 of 4"):
        cpu.lowrank_shrink(x, torch.tensor([0, 4]), torch.tensor([1, 1]), [a_t], [h])
    with pytest.raises(RuntimeError, match="h: fp32"):
        cpu.lowrank_shrink(x, torch.tensor([0, 1]), torch.tensor([1, 1]), [a_t], [h.bfloat16()])
    with pytest.raises(RuntimeError, match="h: fp32"):  # one row per token
        cpu.lowrank_shrink(x, torch.tensor([0, 1]), torch.tensor([1, 1]), [a_t], [torch.empty(3, 4)])
