"""LoRETTA rep in the native path: contract each adapter's TT cores once when it takes a slot (what tenfold does),
or on the fly in every layer call. Times one wrapped layer call of both strategies on the benchmark model with the
issue's workload (32 distinct adapters, 2 decode tokens each, r=8 on q and v), as the engine would run them: tokens
grouped per adapter, one batched matmul chain per strategy.

    .venv/bin/python benchmarks/loretta_rep_contraction.py     # -> results/loretta_rep_contraction.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tenfold.adapters import FAMILIES, ModelSpec
from tenfold.adapters.registry import DECLARATIONS
from tenfold.bench.workload import BENCH_MODEL
from tenfold.kernels.lowrank import lowrank_expand, lowrank_shrink

ADAPTERS, TOKENS_PER_ADAPTER, CALLS = 32, 2, 400


def stacked_cores(adapters, key, part) -> list[torch.Tensor]:
    """Core k of every adapter, stacked: [C, r_{k-1}, n_k, r_k]."""
    return [torch.stack(cores) for cores in zip(*(a.cores(key, part) for a in adapters))]


def contract(cores: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The TT chain of C adapters at once -> [C, rows, cols] (row-major, as `tt_matrix` contracts one)."""
    chunks = cores[0].shape[0]
    out = cores[0].reshape(chunks, -1, cores[0].shape[-1])
    for core in cores[1:]:
        out = torch.bmm(out, core.reshape(chunks, core.shape[1], -1)).reshape(chunks, -1, core.shape[-1])
    return out.reshape(chunks, rows, cols)


def per_call_us(fn) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    spec = ModelSpec(num_layers=BENCH_MODEL["num_layers"], hidden_size=BENCH_MODEL["hidden_size"],
                     num_heads=BENCH_MODEL["num_heads"], num_kv_heads=BENCH_MODEL["num_kv_heads"],
                     head_dim=BENCH_MODEL["hidden_size"] // BENCH_MODEL["num_heads"],
                     intermediate_size=BENCH_MODEL["intermediate_size"])
    settings = DECLARATIONS["loretta_rep"].bench_settings
    adapters = [FAMILIES["loretta_rep"].create(spec, **settings, init="random", seed=i) for i in range(ADAPTERS)]
    layer, r = 3, adapters[0].rank
    modules = [m for (lay, m) in adapters[0].targets if lay == layer]
    x = torch.randn(ADAPTERS, TOKENS_PER_ADAPTER, spec.hidden_size)
    materialized, chains = {}, {}
    for m in modules:
        factors = [a.lora_factors((layer, m)) for a in adapters]  # A [r, in], B [out, r] (scaling folded)
        materialized[m] = (torch.stack([f[0].t() for f in factors]), torch.stack([f[1].t() for f in factors]))
        chains[m] = (stacked_cores(adapters, (layer, m), "lora_A"), stacked_cores(adapters, (layer, m), "lora_B"))
    scaling = adapters[0].config["lora_alpha"] / r

    def slot_time():  # what tenfold does: factors contracted at activation, two matmuls per call and module
        return [lowrank_expand(lowrank_shrink(x, a), b) for a, b in materialized.values()]

    def on_the_fly():  # the cores contracted inside every layer call
        outs = []
        for m, (a_cores, b_cores) in chains.items():
            fan_in, fan_out = spec.module_shape(m)
            a = contract(a_cores, fan_in, r)
            b = contract(b_cores, r, fan_out) * scaling
            outs.append(lowrank_expand(lowrank_shrink(x, a), b))
        return outs

    with torch.no_grad():
        for want, got in zip(slot_time(), on_the_fly()):  # the same update either way
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        at_activation, per_call = per_call_us(slot_time), per_call_us(on_the_fly)
    calls_per_step = spec.num_layers  # q and v live in the one fused qkv call of each layer
    result = {"adapters": ADAPTERS, "tokens_per_adapter": TOKENS_PER_ADAPTER, "rank": r,
              "tensor_rank": adapters[0].config["tensor_rank"], "modules": modules,
              "threads": torch.get_num_threads(),
              "us_per_layer_call": {"contracted_at_activation": at_activation, "contracted_per_call": per_call},
              "ms_per_step": {"contracted_at_activation": at_activation * calls_per_step / 1e3,
                              "contracted_per_call": per_call * calls_per_step / 1e3},
              "bytes_per_adapter_all_layers": {
                  "contracted_factors": 4 * spec.num_layers * sum(r * sum(spec.module_shape(m)) for m in modules),
                  "tt_cores": 4 * spec.num_layers * sum(c[0].numel() for pair in chains.values() for cores in pair
                                                        for c in cores)}}
    out = Path(__file__).resolve().parent / "results" / "loretta_rep_contraction.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
