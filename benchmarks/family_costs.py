"""Per-token cost of each family's native apply on the benchmark model, next to the base model's: the multiply-adds
(MACs) of the apply as tenfold runs it and the bytes of one adapter's slot row (what a step reads per distinct
adapter). Sizes come from the real slot rows (`Bucket.row_tensors`), so this explains the throughput table.

    .venv/bin/python benchmarks/family_costs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tenfold.adapters import FAMILIES, ModelSpec
from tenfold.bench.workload import BENCH_MODEL as MODEL
from tenfold.bench.workload import FAMILY_SETTINGS
from tenfold.engine.families import BUCKETS


def apply_macs(family: str, adapter, spec: ModelSpec) -> int:
    """MACs per token of the native apply (matmuls only) over all layers."""
    shape = spec.module_shape
    total = 0
    for layer, m in adapter.targets:
        fan_in, fan_out = shape(m)
        if family in ("lora", "loretta_rep"):
            total += adapter.rank * (fan_in + fan_out)
        elif family == "miss":
            total += adapter.rank * fan_out  # the block-sum shrink is additions only
        elif family == "lorta":
            total += adapter.rank * fan_out + (adapter.rank * fan_in if m in ("q_proj", "o_proj") else 0)  # one
            # shrink per layer input: qkv's (counted with q) and o's
        elif family == "bat":
            total += 2 * fan_in * fan_out  # block transform D_i x_j, then the second pass over W0
        elif family == "loretta_adp":
            d, b = spec.hidden_size, adapter.rank
            total += 2 * d * b  # the bottleneck itself
    if family == "loretta_adp":  # pre-adapters: the fused gate_up GEMM runs on x + a(x) of the first targeted
        # half (free); each other half is corrected by one pass over its rows of W0
        for layer in range(spec.num_layers):
            pre = [m for m in ("gate_proj", "up_proj") if (layer, m) in adapter.targets]
            if pre:
                total += sum(shape(m)[0] * shape(m)[1] for m in ("gate_proj", "up_proj") if m != pre[0])
    return total


def main() -> None:
    spec = ModelSpec(num_layers=MODEL["num_layers"], hidden_size=MODEL["hidden_size"], num_heads=MODEL["num_heads"],
                     num_kv_heads=MODEL["num_kv_heads"], head_dim=MODEL["hidden_size"] // MODEL["num_heads"],
                     intermediate_size=MODEL["intermediate_size"])
    base_macs = spec.num_layers * sum(a * b for a, b in (spec.module_shape(m) for m in spec.shapes))
    rows = []
    for family, settings in FAMILY_SETTINGS.items():
        adapter = FAMILIES[family].create(spec, **settings, seed=0)
        adapter.validate(spec)
        bucket_cls = BUCKETS[family]
        bucket = bucket_cls(bucket_cls.signature_of(adapter), spec, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            slot_bytes = sum(t.numel() * 4 for t in bucket.row_tensors(adapter).values())
        macs = apply_macs(family, adapter, spec)
        rows.append({"family": family, "settings": settings, "adapter_file_bytes_fp32": adapter.num_params() * 4,
                     "slot_row_bytes_fp32": slot_bytes, "apply_macs_per_token": macs,
                     "apply_macs_vs_base": macs / base_macs})
    print(f"base model: {base_macs / 1e6:.1f} M MACs per token in its linear layers")
    print(f"{'family':12s} {'slot row (fp32)':>16s} {'apply MACs/token':>17s} {'vs base':>8s}")
    for r in rows:
        print(f"{r['family']:12s} {r['slot_row_bytes_fp32'] / 1024:13.1f} KB {r['apply_macs_per_token'] / 1e6:15.2f} M "
              f"{r['apply_macs_vs_base']:8.3f}")
    out = Path(__file__).resolve().parent / "results" / "family_costs.json"
    out.write_text(json.dumps({"base_macs_per_token": base_macs, "families": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
