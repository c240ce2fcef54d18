"""The cases of tests/test_triton_kernels.py, run in a process started with TRITON_INTERPRET=1 (it runs this file):
the Triton kernels, executed by Triton's interpreter on CPU, against their torch reference ops; both against
each family's own math; the device-side token grouping against a plain Python grouping; the dispatch.

Run directly: TRITON_INTERPRET=1 python -m pytest tests/triton_kernel_cases.py

Every case uses fresh seeded random inputs and an output pre-filled with random values: tokens whose row is -1 (and,
when the output is a column slice of a wider buffer, the columns outside it) must keep their bits exactly, and a table
row full of NaN and Inf must change no other row's tokens. Token rows leave some table rows unused, give the groups
uneven sizes and one row several tiles of tokens. The interpreter's tl.dot is wrong on bfloat16 (it multiplies the raw
bits), so the 16-bit cases use float16, which takes the same code paths.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from the start of the process (tests/test_triton_kernels.py sets it)",
                allow_module_level=True)
pytest.importorskip("triton")

from tenfold.adapters import FAMILIES, ModelSpec  # noqa: E402
from tenfold.adapters.lorta.family import MATRICES  # noqa: E402
from tenfold.kernels import dispatch, reference  # noqa: E402
from tenfold.kernels import triton as kernels  # noqa: E402
from tenfold.kernels.launch import LaunchConfig  # noqa: E402
from tenfold.kernels.segments import rows_for_bucket, segments_of  # noqa: E402

SPLIT = LaunchConfig(splits=3, block_n=16, block_k=16, heads_per_program=3)  # several programs per tile and axis
CONFIGS = {"heuristic": None, "split": SPLIT}
DTYPES = {"fp32": (torch.float32, dict(rtol=2e-5, atol=2e-5)), "fp16": (torch.float16, dict(rtol=1e-2, atol=2e-2))}
R = 5  # table rows; the last one is never used


def randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def token_rows(g, tokens=70):
    """Rows of a batch: about one token in five on -1, row R-1 unused, row 1 popular (several tiles of 16)."""
    rows = torch.randint(-1, R - 1, (tokens,), generator=g)
    rows[torch.randperm(tokens, generator=g)[: tokens // 2]] = 1
    return rows


def batch(seed, tokens=70):
    """A generator, the rows of a batch (see token_rows) and their segments."""
    g = torch.Generator().manual_seed(seed)
    rows = token_rows(g, tokens)
    return g, rows, segments_of(rows, R)


def compare(apply, rows, out_features, g, dtype=torch.float32, tolerance=None, slice_of_wider=False):
    """Run apply(implementation, output) with the kernels and with the reference ops on the same poisoned output."""
    tokens = rows.numel()
    offset = 8 if slice_of_wider else 0
    poisoned = randn(g, tokens, out_features + 2 * offset, dtype=dtype)
    results = {}
    for name, implementation in (("kernel", kernels), ("reference", reference)):
        buffer = poisoned.clone()
        apply(implementation, buffer[:, offset:offset + out_features])
        results[name] = buffer
    outside = rows < 0
    for name, buffer in results.items():
        assert torch.equal(buffer[outside], poisoned[outside]), f"{name}: rows of tokens outside the bucket changed"
        if slice_of_wider:
            assert torch.equal(buffer[:, :offset], poisoned[:, :offset]), f"{name}: columns left of the slice changed"
            assert torch.equal(buffer[:, -offset:], poisoned[:, -offset:]), f"{name}: columns right of it changed"
    columns = slice(offset, offset + out_features)
    changed = results["reference"][~outside, columns] != poisoned[~outside, columns]
    assert changed.float().mean() > 0.9, "the update should change the bucket's rows"
    torch.testing.assert_close(results["kernel"].float(), results["reference"].float(),
                               **(tolerance or DTYPES["fp32"][1]))


# -- segments --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,rows_in_table,block_m", [(70, 5, 16), (3, 8, 16), (40, 1, 4), (1, 4, 16), (9, 3, 2)])
def test_segments_group_tokens_by_row_in_tiles(tokens, rows_in_table, block_m):
    g = torch.Generator().manual_seed(tokens * 31 + rows_in_table)
    rows = torch.randint(-1, rows_in_table, (tokens,), generator=g)
    seg = segments_of(rows, rows_in_table, block_m)
    order = seg.token_order.tolist()
    for r in range(rows_in_table):
        start, count = int(seg.row_start[r]), int(seg.row_count[r])
        assert order[start:start + count] == [t for t in range(tokens) if rows[t] == r], "stable grouping by row"
    assert sorted(order) == list(range(tokens)), "every token once"
    covered = []
    for row, begin, end in seg.tiles.tolist():
        if row < 0:
            continue
        assert 0 < end - begin <= block_m and int(seg.row_start[row]) <= begin
        assert end <= int(seg.row_start[row] + seg.row_count[row])
        covered += order[begin:end]
    assert sorted(covered) == sorted(t for t in range(tokens) if rows[t] >= 0), "the tiles cover the bucket's tokens"


def test_rows_for_bucket_maps_slots_to_rows_of_one_bucket():
    slot_of_token = torch.tensor([3, -1, 0, 2, 3, 1])
    bucket_of_slot = torch.tensor([0, 1, 0, 0])
    row_of_slot = torch.tensor([4, 0, 1, 2])
    assert rows_for_bucket(slot_of_token, bucket_of_slot, row_of_slot, 0).tolist() == [2, -1, 4, 1, 2, -1]


def test_segments_and_reference_ops_trace_without_graph_breaks():
    """No host sync and no data-dependent Python branch: dynamo traces the grouping and an apply in one graph."""

    def step(rows, x, a, b, output):
        seg = segments_of(rows, R)
        reference.lowrank_apply(x, a, b, seg, output)
        return output

    g = torch.Generator().manual_seed(0)
    rows, x = token_rows(g, 20), randn(g, 20, 24)
    a, b, poisoned = randn(g, R, 24, 4), randn(g, R, 4, 16), randn(g, 20, 16)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(rows, x, a, b, poisoned.clone()), step(rows, x, a, b, poisoned.clone()))


# -- kernels against reference ops -----------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.keys())
def test_lowrank(config, dtype):
    dtype, tolerance = DTYPES[dtype]
    g, rows, seg = batch(1)
    x, a = randn(g, 70, 72, dtype=dtype), randn(g, R, 72, 6, scale=0.12, dtype=dtype)
    b = randn(g, R, 6, 40, dtype=dtype)
    compare(lambda ops, out: ops.lowrank_apply(x, a, b, seg, out, config), rows, 40, g, dtype, tolerance,
            slice_of_wider=True)
    live = rows >= 0
    u_kernel, u_reference = kernels.lowrank_shrink(x, a, seg, config), reference.lowrank_shrink(x, a, seg)
    torch.testing.assert_close(u_kernel.sum(0)[live], u_reference.sum(0)[live], **tolerance)


@pytest.mark.parametrize("rows", [[0], [-1, -1, -1], [2, 0], list(range(R)) * 7], ids=["one", "none", "few", "even"])
def test_lowrank_edge_batches(rows):
    rows = torch.tensor(rows)
    g = torch.Generator().manual_seed(2)
    seg = segments_of(rows, R)
    x, a, b = randn(g, len(rows), 40), randn(g, R, 40, 16, scale=0.15), randn(g, R, 16, 24)
    poisoned = randn(g, len(rows), 24)
    got, want = poisoned.clone(), poisoned.clone()
    kernels.lowrank_apply(x, a, b, seg, got)
    reference.lowrank_apply(x, a, b, seg, want)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert torch.equal(got[rows < 0], poisoned[rows < 0])


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("variant", ["default", "mini", "uneven_blocks"])
def test_miss(variant, config):
    g, rows, seg = batch(3)
    fan_in, rank, columns = {"default": (64, 16, 48), "mini": (64, 16, 8), "uneven_blocks": (70, 12, 48)}[variant]
    x, d = randn(g, 70, fan_in), randn(g, R, rank, columns, scale=0.2)
    compare(lambda ops, out: ops.miss_apply(x, d, seg, out, config), rows, 48, g)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.keys())
def test_lorta_heads_out_fused_qkv(config, dtype):
    dtype, tolerance = DTYPES[dtype]
    g, rows, seg = batch(4)
    layers, heads, kv_heads, head_dim, rank = 3, 4, 2, 12, 6
    x, a = randn(g, 70, 48, dtype=dtype), randn(g, R, 48, rank, scale=0.15, dtype=dtype)
    b = randn(g, R, rank, head_dim, dtype=dtype)
    head_weights = randn(g, R, layers, heads + 2 * kv_heads, rank, dtype=dtype)[:, 1]  # one layer's slice: strided
    compare(lambda ops, out: ops.lorta_heads_out_apply(x, a, head_weights, b, seg, out, config), rows,
            (heads + 2 * kv_heads) * head_dim, g, dtype, tolerance)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_lorta_heads_in(config):
    g, rows, seg = batch(5)
    layers, heads, head_dim, rank, out_features = 3, 4, 12, 6, 24
    x, b_t, c_h = randn(g, 70, heads * head_dim), randn(g, R, head_dim, rank, scale=0.3), randn(g, R, heads, rank)
    c_lm = randn(g, R, layers, 4, rank)[:, 2, 1]  # C_lm[:, layer, matrix]: strided
    a_t = randn(g, R, rank, out_features, scale=0.5)
    compare(lambda ops, out: ops.lorta_heads_in_apply(x, b_t, c_h, c_lm, a_t, seg, out, config), rows,
            out_features, g)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "quick_gelu"])
def test_bottleneck(act):
    g, rows, seg = batch(6)
    width, bottleneck = 40, 10
    z = randn(g, 70, width)
    w_down, b_down = randn(g, R, width, bottleneck, scale=0.3), randn(g, R, bottleneck, scale=0.3)
    w_up, b_up, scaling = randn(g, R, bottleneck, width), randn(g, R, width), randn(g, R)
    compare(lambda ops, out: ops.bottleneck_apply(z, w_down, b_down, w_up, b_up, scaling, seg, out, act=act,
                                                  config=SPLIT), rows, width, g)


def test_bottleneck_post_adapter_reads_the_output_it_updates():
    """down_proj's post-adapter: z is the output itself; the kernel must read all of z before writing."""
    g, rows, seg = batch(7)
    width, bottleneck = 40, 10
    w_down, b_down = randn(g, R, width, bottleneck, scale=0.3), randn(g, R, bottleneck, scale=0.3)
    w_up, b_up, scaling = randn(g, R, bottleneck, width), randn(g, R, width), randn(g, R)
    compare(lambda ops, out: ops.bottleneck_apply(out, w_down, b_down, w_up, b_up, scaling, seg, out, act="silu",
                                                  config=SPLIT), rows, width, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.keys())
@pytest.mark.parametrize("block", [16, 8])
def test_bat(block, dtype):
    dtype, tolerance = DTYPES[dtype]
    g, rows, seg = batch(8, 40)
    fan_in, fan_out = 64, 48
    x, w0 = randn(g, 40, fan_in, dtype=dtype), randn(g, fan_out, fan_in, scale=0.1, dtype=dtype)
    d = randn(g, R, fan_out // block, block, block, scale=0.2, dtype=dtype)
    compare(lambda ops, out: ops.bat_apply(x, d, w0, seg, out), rows, fan_out, g, dtype, tolerance,
            slice_of_wider=True)


# -- one table row full of NaN and Inf reaches no other row's tokens -------------------------------------------------

def poisoned(table, row=0):
    """A copy of a table [R, ...] whose row `row` holds NaN and +Inf, alternating (a tenant past validation)."""
    copy = table.clone()
    pattern = torch.full((copy[row].numel(),), float("inf"))
    pattern[0::2] = float("nan")
    copy[row].copy_(pattern.view(copy[row].shape))
    return copy


def applies(g, seg):
    """Per op: (its tables [R, ...], output width, apply(ops, tables, output)) on random inputs of the segments'
    tokens."""
    x, z = randn(g, seg.num_tokens, 48), randn(g, seg.num_tokens, 40)
    layers, heads, kv_heads, head_dim = 3, 4, 2, 12
    w0 = randn(g, 48, 48, scale=0.1)

    def bottleneck_tables():
        return [randn(g, R, 40, 10, scale=0.3), randn(g, R, 10), randn(g, R, 10, 40), randn(g, R, 40), randn(g, R)]

    return {
        "lowrank": ([randn(g, R, 48, 6, scale=0.12), randn(g, R, 6, 40)], 40,
                    lambda ops, t, out: ops.lowrank_apply(x, *t, seg, out, SPLIT)),
        "miss": ([randn(g, R, 16, 8, scale=0.2)], 40, lambda ops, t, out: ops.miss_apply(x, *t, seg, out, SPLIT)),
        "lorta_heads_out": ([randn(g, R, 48, 6, scale=0.15), randn(g, R, layers, heads + 2 * kv_heads, 6)[:, 1],
                             randn(g, R, 6, head_dim)], (heads + 2 * kv_heads) * head_dim,
                            lambda ops, t, out: ops.lorta_heads_out_apply(x, *t, seg, out, SPLIT)),
        "lorta_heads_in": ([randn(g, R, head_dim, 6, scale=0.3), randn(g, R, heads, 6),
                            randn(g, R, layers, 4, 6)[:, 2, 1], randn(g, R, 6, 40, scale=0.5)], 40,
                           lambda ops, t, out: ops.lorta_heads_in_apply(x, *t, seg, out, SPLIT)),
        "bottleneck": (bottleneck_tables(), 40,
                       lambda ops, t, out: ops.bottleneck_apply(z, *t, seg, out, act="tanh", config=SPLIT)),
        "bottleneck_post": (bottleneck_tables(), 40,  # the post-adapter: z is the output it updates
                            lambda ops, t, out: ops.bottleneck_apply(out, *t, seg, out, act="silu", config=SPLIT)),
        "bat": ([randn(g, R, 48 // 16, 16, 16, scale=0.2)], 48,
                lambda ops, t, out: ops.bat_apply(x, *t, w0, seg, out)),
    }


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
@pytest.mark.parametrize("op", ["lowrank", "miss", "lorta_heads_out", "lorta_heads_in", "bottleneck",
                                "bottleneck_post", "bat"])
def test_a_poisoned_row_reaches_no_other_rows_tokens(op):
    """Row 0 (used by tokens, and the row the reference ops read for unused tiles) full of NaN and Inf: every other
    token's output keeps the bits it has with clean tables, in the kernels and in the reference ops."""
    g, rows, seg = batch(11, tokens=40)
    tables, width, apply = applies(g, seg)[op]
    start = randn(g, 40, width)
    others = rows != 0
    for ops in (kernels, reference):
        outputs = {}
        for name, used in (("clean", tables), ("poisoned", [poisoned(t) for t in tables])):
            outputs[name] = start.clone()
            apply(ops, used, outputs[name])
        assert torch.equal(outputs["poisoned"][others], outputs["clean"][others]), f"{ops.__name__}: leaked"
        assert not outputs["poisoned"][~others].isfinite().all(), f"{ops.__name__}: the poison should show"


# -- both against each family's own math -----------------------------------------------------------------------------

SPEC = ModelSpec(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48)
LAYER = 1


def adapters_of(family, **kwargs):
    adapters = [FAMILIES[family].create(SPEC, seed=10 + i, **kwargs) for i in range(R - 1)]
    for adapter in adapters:
        adapter.validate(SPEC)
    return adapters


def frozen(module, g):
    fan_in, fan_out = SPEC.module_shape(module)
    linear = torch.nn.Linear(fan_in, fan_out, bias=False)
    linear.weight.data = randn(g, fan_out, fan_in, scale=0.2)
    return linear


def stacked(tables):
    """Per-adapter tables -> [R, ...], the unused last row random (a stale adapter's leftovers)."""
    leftovers = torch.randn(1, *tables[0].shape, generator=torch.Generator().manual_seed(99))
    return torch.cat([torch.stack(tables), leftovers])


def check_family(adapters, modules, apply, seed, tokens=40):
    """apply(ops, x, seg, output, frozen linears) on the fused `modules` equals each token's adapter applied module
    by module (Adapter.apply, the math the HuggingFace comparisons check)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-1, R - 1, (tokens,), generator=g)
    seg = segments_of(rows, R)
    linears = {m: frozen(m, g) for m in modules}
    x = randn(g, tokens, SPEC.module_shape(modules[0])[0])
    base = torch.cat([linears[m](x) for m in modules], 1).detach()
    want = base.clone()
    with torch.no_grad():
        for t, row in enumerate(rows.tolist()):
            if row >= 0:
                want[t] = torch.cat([adapters[row].forward((LAYER, m), x[t:t + 1], linears[m]) for m in modules], 1)[0]
    for ops in (reference, kernels):
        got = base.clone()
        apply(ops, x, seg, got, linears)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{ops.__name__}: {m}")


def test_lowrank_tables_follow_lora_math():
    adapters = adapters_of("lora", target_modules=["v_proj"], r=4)
    a = stacked([ad.lora_factors((LAYER, "v_proj"))[0].t() for ad in adapters])
    b = stacked([ad.lora_factors((LAYER, "v_proj"))[1].t() for ad in adapters])
    check_family(adapters, ["v_proj"], lambda ops, x, seg, out, _: ops.lowrank_apply(x, a, b, seg, out), seed=20)


def test_lorta_heads_out_tables_follow_lorta_math():
    adapters = adapters_of("lorta", r=6, orientation="heads_out")
    qkv = ["q_proj", "k_proj", "v_proj"]

    def head_weights(ad):  # [L, heads of q|k|v, r]: c_lm * C_h, C_h group-averaged for k and v
        c_h = ad.tensor("lora_C_h")
        c_lm = ad.tensor("lora_C_l")[:, None, :] * ad.tensor("lora_C_m")[None] * ad.scale
        heads = {m: c_h.reshape(-1, SPEC.group_size, c_h.shape[1]).mean(1) if m != "q_proj" else c_h for m in qkv}
        return torch.cat([c_lm[:, MATRICES.index(m), None, :] * heads[m][None] for m in qkv], 1)

    a, b = stacked([ad.tensor("lora_A") for ad in adapters]), stacked([ad.tensor("lora_B") for ad in adapters])
    hw = stacked([head_weights(ad) for ad in adapters])[:, LAYER]
    check_family(adapters, qkv, lambda ops, x, seg, out, _: ops.lorta_heads_out_apply(x, a, hw, b, seg, out), seed=21)


def test_lorta_heads_in_tables_follow_lorta_math():
    adapters = adapters_of("lorta", r=6, orientation="heads_in")
    b_t = stacked([ad.tensor("lora_B").t() for ad in adapters])
    c_h = stacked([ad.tensor("lora_C_h") for ad in adapters])
    c_lm = stacked([ad.tensor("lora_C_l")[LAYER] * ad.tensor("lora_C_m")[MATRICES.index("k_proj")] * ad.scale
                    for ad in adapters])
    a_t_kv = stacked([ad.tensor("lora_A").reshape(-1, SPEC.group_size, SPEC.head_dim, 6).mean(1).reshape(-1, 6).t()
                      for ad in adapters])
    check_family(adapters, ["k_proj"],
                 lambda ops, x, seg, out, _: ops.lorta_heads_in_apply(x, b_t, c_h, c_lm, a_t_kv, seg, out), seed=22)


@pytest.mark.parametrize("variant", ["default", "mini"])
def test_miss_tables_follow_miss_math(variant):
    extra = dict(variant="mini", mini_r=8) if variant == "mini" else {}
    adapters = adapters_of("miss", target_modules=["gate_proj"], r=12, **extra)  # 12 does not divide 32
    d = stacked([ad.block((LAYER, "gate_proj")) for ad in adapters])
    check_family(adapters, ["gate_proj"], lambda ops, x, seg, out, _: ops.miss_apply(x, d, seg, out), seed=23)


def test_bat_tables_follow_bat_math():
    adapters = adapters_of("bat", target_modules=["up_proj"], r=8)
    d = stacked([ad.block((LAYER, "up_proj")) for ad in adapters])
    check_family(adapters, ["up_proj"],
                 lambda ops, x, seg, out, linears: ops.bat_apply(x, d, linears["up_proj"].weight.detach(), seg, out),
                 seed=24)


def test_bottleneck_tables_follow_loretta_adp_math():
    """The post-adapter on down_proj: output = y + s * adp(y) with y the base output, updated in place."""
    adapters = adapters_of("loretta_adp", target_modules=["down_proj"], bottleneck_size=8, non_linearity="tanh",
                           scaling=0.7)
    parts = list(zip(*[ad.bottleneck((LAYER, "down_proj")) for ad in adapters]))
    w_down, b_down, w_up, b_up = (stacked(list(p)) for p in parts[:4])
    scaling = stacked([torch.tensor(float(s)) for s in parts[4]])
    check_family(adapters, ["down_proj"],
                 lambda ops, x, seg, out, _: ops.bottleneck_apply(out, w_down, b_down, w_up, b_up, scaling, seg, out,
                                                                  act="tanh"), seed=25)


# -- dispatch ---------------------------------------------------------------------------------------------------------

def test_dispatch_picks_reference_ops_off_cuda_and_kernels_when_forced():
    cpu = torch.device("cpu")
    for name in dispatch.OPS:
        assert dispatch.pick(name, cpu) is getattr(reference, name)
    with dispatch.forced("triton"):
        assert dispatch.pick("lowrank_apply", cpu) is kernels.lowrank_apply
        g = torch.Generator().manual_seed(9)
        rows = token_rows(g, 20)
        seg = dispatch.segments_of(rows, R)
        x, a, b, poisoned = randn(g, 20, 24), randn(g, R, 24, 4), randn(g, R, 4, 16), randn(g, 20, 16)
        got, want = poisoned.clone(), poisoned.clone()
        dispatch.lowrank_apply(x, a, b, seg, got)
        reference.lowrank_apply(x, a, b, seg, want)
        torch.testing.assert_close(got, want)
        # an activation the kernel does not compute runs on the reference op
        w_down, b_down, w_up, b_up = randn(g, R, 24, 8), randn(g, R, 8), randn(g, R, 8, 24), randn(g, R, 24)
        s = randn(g, R)
        got = randn(g, 20, 24)
        want = got.clone()
        dispatch.bottleneck_apply(x, w_down, b_down, w_up, b_up, s, seg, got, act="relu6")
        reference.bottleneck_apply(x, w_down, b_down, w_up, b_up, s, seg, want, act="relu6")
        assert torch.equal(got, want)
    with pytest.raises(KeyError):
        dispatch.pick("no_such_op", cpu)
