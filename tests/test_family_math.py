"""Every family's on-the-fly module equals its dense delta merged into the weights; exact LoRA forms are exact."""

from __future__ import annotations

import pytest
import torch

from adapter_cases import CASES, make
from tenfold.adapters import NoExactLoRAError, attach
from tenfold.adapters.attach import find_linears

LINEAR_DELTA_CASES = [c for c, (family, _) in CASES.items() if family != "loretta_adp"]
EXACT_LORA_CASES = [c for c, (family, _) in CASES.items() if family not in ("bat", "loretta_adp")]


def reference_delta(adapter, spec, key, base_weight=None) -> torch.Tensor:
    """The dense update [out, in] of one module, written out here from each family's official formula and read from
    the adapter's raw tensors only (never from its own math), so it can disagree with the family code."""
    layer, module = key
    fan_in, fan_out = spec.module_shape(module)
    t = adapter.tensor
    name = f"layers.{layer}.{module}"
    cfg = adapter.config
    if adapter.family == "lora":  # PEFT: scaling * B @ A, scaling alpha/r
        return cfg["lora_alpha"] / cfg["r"] * t(f"{name}.lora_B") @ t(f"{name}.lora_A")
    if adapter.family == "lorta":  # the fork: cat_h A diag(C_h[h] C_m[m] C_l[l]) B, applied as x @ delta^T
        a, b, c_h = t("lora_A"), t("lora_B"), t("lora_C_h")
        m = ["q_proj", "k_proj", "v_proj", "o_proj"].index(module)
        heads = [a @ torch.diag(c_h[h] * t("lora_C_m")[m] * t("lora_C_l")[layer]) @ b for h in range(spec.num_heads)]
        full = torch.cat(heads, dim=1) * cfg["lora_alpha"] / cfg["r"]  # [d, H*d_h] as the fork builds it
        linear = full.t() if cfg["orientation"] == "heads_out" else full  # nn.Linear layout [out, in]
        if module in ("k_proj", "v_proj") and spec.group_size > 1:
            # tenfold's GQA rule: key/value head g gets the mean of its query heads' rows (output heads)
            linear = linear.reshape(spec.num_kv_heads, spec.group_size, -1, linear.shape[1]).mean(1)
            linear = linear.reshape(-1, linear.shape[-1])
        return linear
    if adapter.family == "loretta_rep":  # LoRETTA: contract the TT cores in order, row-major, x @ W_A @ W_B
        def contract(part, rows, cols):
            cores = [t(f"{name}.{part}.cores.{k}") for k in range(len(adapter._cores[key][part]))]
            out = cores[0].reshape(-1, cores[0].shape[-1])
            for core in cores[1:]:
                out = (out @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
            return out.reshape(rows, cols)
        r = cfg["r"]
        w_a, w_b = contract("lora_A", fan_in, r), contract("lora_B", r, fan_out)
        return (cfg["lora_alpha"] / r) * (w_a @ w_b).t()
    if adapter.family == "miss":  # MiSS: y += sum_j x_j @ D (x cut in width-r blocks); mini: D = M tiled along out
        block = t(f"{name}.miss_block")
        r = cfg["r"]
        d = block if cfg["variant"] == "default" else torch.cat([block] * (fan_out // block.shape[1]), dim=1)
        return torch.stack([d[i % r] for i in range(fan_in)], dim=1)  # delta[o, i] = D[i mod r, o]
    if adapter.family == "bat":  # Bat: block (i, j) of the update is (W0_ij + I) D_i
        d, r = t(f"{name}.miss_block"), cfg["r"]
        out = torch.zeros(fan_out, fan_in, dtype=d.dtype)
        for i in range(fan_out // r):
            for j in range(fan_in // r):
                w_ij = base_weight[i * r:(i + 1) * r, j * r:(j + 1) * r].to(d.dtype)
                out[i * r:(i + 1) * r, j * r:(j + 1) * r] = (w_ij + torch.eye(r, dtype=d.dtype)) @ d[i]
        return out
    raise AssertionError(adapter.family)


def random_ids(seed: int, batch: int = 3, length: int = 14) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def merged_logits(model, adapter, spec, ids):
    """Logits with every reference delta (written out above, independent of the family's code) added into the base
    weights (then restored)."""
    linears = find_linears(model)
    saved = {}
    try:
        for key in adapter.targets:
            weight = linears[key][2].weight
            saved[key] = weight.data.clone()
            weight.data += reference_delta(adapter, spec, key, weight.data)
        return model(ids).logits
    finally:
        for key, original in saved.items():
            linears[key][2].weight.data.copy_(original)


@pytest.mark.parametrize("case", LINEAR_DELTA_CASES)
def test_module_equals_merged_delta(case, model_name, hf_models, specs):
    model, spec = hf_models[model_name], specs[model_name]
    adapter = make(case, spec, seed=11)
    ids = random_ids(1)
    with torch.no_grad():
        base = model(ids).logits
        with attach(model, adapter):
            ours = model(ids).logits
        after = model(ids).logits
    merged = merged_logits(model, adapter, spec, ids)
    assert (ours - base).abs().max() > 0.05, "the adapter must visibly change the logits"
    assert (ours - merged).abs().max().item() <= 1e-5
    assert torch.equal(after, base), "detach must restore the model exactly"


@pytest.mark.parametrize("case", EXACT_LORA_CASES)
def test_exact_lora_form(case, model_name, specs):
    """The LoRA form (what `tenfold convert` writes and convert mode serves) equals the official formula."""
    spec = specs[model_name]
    adapter = make(case, spec, seed=3)
    adapter.validate(spec)
    for key in adapter.targets:
        a, b = adapter.lora_factors(key)
        fan_in, fan_out = spec.module_shape(key[1])
        assert a.shape == (adapter.rank, fan_in) and b.shape == (fan_out, adapter.rank)
        expected = reference_delta(adapter, spec, key)
        assert expected.abs().max() > 1e-4, "a zero reference would prove nothing"
        torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.delta(key), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["bat", "loretta_adp"])
def test_no_exact_lora_form_is_a_clear_error(case, specs):
    adapter = make(case, specs["mha"])
    with pytest.raises(NoExactLoRAError, match="no exact LoRA form.*native path"):
        adapter.lora_factors(adapter.targets[0])


@pytest.mark.parametrize("orientation", ["heads_in", "heads_out"])
def test_lorta_gqa_kv_update_is_group_mean_of_query_head_updates(orientation, specs):
    """tenfold's GQA definition: key/value head g gets the mean of the updates its query heads would get on an
    equivalent multi-head model (computed here independently, from the fork's per-head formula)."""
    spec = specs["gqa"]
    adapter = make("lorta_heads_in", spec, seed=5, orientation=orientation)
    adapter.validate(spec)
    a, b = adapter.tensor("lora_A"), adapter.tensor("lora_B")
    c_l, c_h, c_m = adapter.tensor("lora_C_l"), adapter.tensor("lora_C_h"), adapter.tensor("lora_C_m")
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    layer, m = 2, 1  # k_proj
    per_head = [a @ torch.diag(c_h[h] * c_m[m] * c_l[layer]) @ b for h in range(spec.num_heads)]  # [d, d_h] each
    full = torch.cat(per_head, dim=1) * scale  # the fork's delta for an MHA model: [d, H*d_h]
    as_linear = full.t() if orientation == "heads_out" else full  # nn.Linear layout [out, in]
    heads = as_linear.reshape(spec.num_heads, spec.head_dim, -1)
    expected = heads.reshape(spec.num_kv_heads, spec.group_size, spec.head_dim, -1).mean(1).reshape(-1, heads.shape[-1])
    torch.testing.assert_close(adapter.delta((layer, "k_proj")), expected, rtol=1e-5, atol=1e-6)
    # the query projection keeps every head: exactly the fork's formula
    q_full = torch.cat([a @ torch.diag(c_h[h] * c_m[0] * c_l[layer]) @ b for h in range(spec.num_heads)], dim=1) * scale
    torch.testing.assert_close(adapter.delta((layer, "q_proj")), q_full.t() if orientation == "heads_out" else q_full,
                               rtol=1e-5, atol=1e-6)


def test_attaching_twice_is_refused(hf_models, specs):
    model = hf_models["mha"]
    first, second = make("lora", specs["mha"], seed=1), make("miss", specs["mha"], seed=2)
    with attach(model, first):
        with pytest.raises(ValueError, match="already carries an adapter"):
            attach(model, second)


# --- sizes: what a LoRTA slot row and a served adapter really cost --------------------------------------------------

LLAMA2_7B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=11008)


@pytest.mark.parametrize("orientation, row_params", [
    # heads_out: A^T [r, d] + B [r, d_h] + per-(layer, matrix) head weights [L, H, r] for q, k, v, o + the fused
    # q|k|v copy [L, 3H, r]
    ("heads_out", 64 * 4096 + 64 * 128 + 4 * 32 * 32 * 64 + 32 * 96 * 64),
    # heads_in: B^T + C_h + A^T for q/o and its k/v group mean (the same on MHA) + C_lm [L, 4, r]
    ("heads_in", 64 * 128 + 32 * 64 + 2 * 64 * 4096 + 32 * 4 * 64),
])
@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_lorta_slot_row_size_on_llama2_7b_shapes(orientation, row_params, cpu_kernels):
    """Measured, shapes only (random factors, no weights): at r=64 the adapter holds 275k parameters; its heads_out
    slot row 729k (2.65x, 2.9 MB in fp32), its heads_in row 542k (1.97x), or beside tenfold's CPU kernels 795k
    (2.89x: their product A_in [r, d] replaces B^T and C_h). The README quotes these numbers."""
    from tenfold.adapters import FAMILIES, ModelSpec
    from tenfold.engine.buckets import BUCKETS
    from tenfold.engine.sharding import Shard

    spec = ModelSpec(**LLAMA2_7B)
    adapter = FAMILIES["lorta"].create(spec, r=64, orientation=orientation)
    adapter.validate(spec)
    assert adapter.num_params() == 64 * (4096 + 128 + 32 + 32 + 4) == 274_688
    bucket = BUCKETS["lorta"](BUCKETS["lorta"].signature_of(adapter), spec, torch.float32, torch.device("cpu"),
                              Shard(spec), cpu_kernels=cpu_kernels)
    with torch.no_grad():
        measured = sum(t.numel() for t in bucket.row_tensors(adapter).values())
    if cpu_kernels and orientation == "heads_in":
        row_params += 64 * 4096 - (64 * 128 + 32 * 64)  # A_in [r, d] instead of B^T and C_h
    assert measured == row_params
    assert {"heads_out": 729_088, "heads_in": 794_624 if cpu_kernels else 542_720}[orientation] == row_params


@pytest.mark.parametrize("mode", ["native", "convert"])
def test_adapter_facts_report_real_worker_bytes(mode, specs, tmp_path, monkeypatch):
    """Worker bytes follow the table dtype and count every tensor-parallel rank, against sizes written out here."""
    import dataclasses

    from tenfold.adapters import save_adapter
    from tenfold.engine import loader

    monkeypatch.setenv("TENFOLD_MODE", mode)
    spec = specs["mha"]
    adapter = make("lora", spec, seed=21, target_modules=["q_proj", "down_proj"], r=8)
    adapter.validate(spec)
    save_adapter(adapter, tmp_path / "lora")
    d, ff, layers, r = spec.hidden_size, spec.intermediate_size, spec.num_layers, 8
    a_q, b_q, a_down, b_down = r * d, d * r, r * ff, d * r  # q_proj [256->256], down_proj [512->256]
    for dtype, tp in ((torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2)):
        facts = loader.adapter_facts(tmp_path / "lora", spec, tensor_parallel_size=tp, worker_dtype=dtype)
        element = 4 if dtype == torch.float32 else 2
        # column-parallel q: A whole on every rank, B split; row-parallel down: A split, B whole on every rank
        entries = layers * (tp * a_q + b_q + a_down + tp * b_down)
        assert facts.worker_bytes == entries * element, (dtype, tp)
        assert facts.params == layers * (a_q + b_q + a_down + b_down) and facts.nbytes == facts.params * 4
        assert dataclasses.asdict(facts)["worker_dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("case", ["loretta_rep", "miss"])
def test_facts_reuse_the_request_checks_load(case, specs, tmp_path, monkeypatch):
    """A request's metrics label and a scrape read the adapter's facts from the load the request check made (the same
    tensor-parallel size): no second read of the files, no slot row rebuilt per call."""
    from tenfold.adapters import save_adapter
    from tenfold.engine import loader

    spec = specs["gqa"]
    adapter = make(case, spec, seed=23)
    adapter.validate(spec)
    save_adapter(adapter, tmp_path / case)
    loader.load_for_native(tmp_path / case, spec, 2)  # the request check's load
    calls = []
    for name in ("load_adapter", "_row_params"):
        original = getattr(loader, name)
        monkeypatch.setattr(loader, name, lambda *a, _name=name, _original=original, **k: calls.append(_name)
                            or _original(*a, **k))
    for _ in range(3):
        facts = loader.adapter_facts(tmp_path / case, spec, tensor_parallel_size=2)
    assert calls == [] and facts.family == case and facts.params == adapter.num_params()
