"""Per-token cost of each family's native apply on the benchmark model, next to the base model's: the multiply-adds
(MACs) of the apply as tenfold runs it and the bytes of one adapter's slot row (what a step reads per distinct
adapter). Sizes come from the real slot rows (`Bucket.row_tensors`), so this explains the throughput table.

    .venv/bin/python benchmarks/family_costs.py                      # the random benchmark model
    .venv/bin/python benchmarks/family_costs.py --model smollm2 --adapters 32 --tokens 64

With --adapters N --tokens T it also states one decode step of T tokens over N distinct adapters: the bytes of
slot rows the step reads (fp32 tables, and in the model's dtype) beside the base model's weight bytes, and each
family's FLOP floor, 1 / (1 + apply MACs / model MACs), the model's MACs including its logits head.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tenfold.adapters import FAMILIES, ModelSpec
from tenfold.adapters.registry import DECLARATIONS
from tenfold.bench.workload import BENCH_MODEL as MODEL
from tenfold.engine.buckets import BUCKETS


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


def model_spec(name: str | None) -> tuple[ModelSpec, str, int]:
    """The spec, a label and the vocabulary size of --model (default: the random benchmark model)."""
    if name is None:
        spec = ModelSpec(num_layers=MODEL["num_layers"], hidden_size=MODEL["hidden_size"],
                         num_heads=MODEL["num_heads"], num_kv_heads=MODEL["num_kv_heads"],
                         head_dim=MODEL["hidden_size"] // MODEL["num_heads"],
                         intermediate_size=MODEL["intermediate_size"])
        return spec, "random", MODEL.get("vocab_size", 0)
    from tenfold.bench.workload import resolve_model

    directory = resolve_model(name, Path.home() / ".cache" / "tenfold" / "bench")
    config = json.loads((directory / "config.json").read_text())
    return ModelSpec.from_pretrained(directory), directory.name, config["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="smollm2 or a model directory (default: the random benchmark model)")
    parser.add_argument("--adapters", type=int, default=0, help="distinct adapters in one decode step")
    parser.add_argument("--tokens", type=int, default=64, help="tokens in that step")
    args = parser.parse_args()
    spec, label, vocab = model_spec(args.model)
    base_macs = spec.num_layers * sum(a * b for a, b in (spec.module_shape(m) for m in spec.shapes))
    head_macs = spec.hidden_size * vocab  # the logits of every decoded token
    model_element = torch.empty((), dtype=spec.dtype).element_size() if args.model else 4
    rows = []
    for family, settings in ((f, d.bench_settings) for f, d in DECLARATIONS.items()):
        adapter = FAMILIES[family].create(spec, **settings, seed=0)
        adapter.validate(spec)
        bucket_cls = BUCKETS[family]
        bucket = bucket_cls(bucket_cls.signature_of(adapter), spec, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            slot_bytes = sum(t.numel() * 4 for t in bucket.row_tensors(adapter).values())
        macs = apply_macs(family, adapter, spec)
        row = {"family": family, "settings": settings, "adapter_file_bytes_fp32": adapter.num_params() * 4,
               "slot_row_bytes_fp32": slot_bytes, "apply_macs_per_token": macs,
               "apply_macs_vs_base": macs / base_macs,
               "flop_floor": 1 / (1 + macs / (base_macs + head_macs))}
        if args.adapters:
            row["step_table_bytes_fp32"] = args.adapters * slot_bytes
            row["step_table_bytes_model_dtype"] = args.adapters * slot_bytes * model_element // 4
        rows.append(row)
    weight_bytes = (spec.num_layers * sum(a * b for a, b in (spec.module_shape(m) for m in spec.shapes))
                    + head_macs) * model_element
    print(f"{label}: {base_macs / 1e6:.1f} M MACs per token in its decoder linears, {head_macs / 1e6:.1f} M in its "
          f"logits head; {weight_bytes / 1e6:.0f} MB of those weights read per step")
    print(f"{'family':12s} {'slot row (fp32)':>16s} {'apply MACs/token':>17s} {'vs base':>8s} {'FLOP floor':>10s}"
          + (f" {'step tables fp32 / model dtype':>31s}" if args.adapters else ""))
    for r in rows:
        step = (f" {r['step_table_bytes_fp32'] / 1e6:16.0f} MB / {r['step_table_bytes_model_dtype'] / 1e6:5.0f} MB"
                if args.adapters else "")
        print(f"{r['family']:12s} {r['slot_row_bytes_fp32'] / 1024:13.1f} KB {r['apply_macs_per_token'] / 1e6:15.2f} M "
              f"{r['apply_macs_vs_base']:8.3f} {r['flop_floor']:10.3f}{step}")
    name = "family_costs.json" if args.model is None else f"family_costs_{label}.json"
    out = Path(__file__).resolve().parent / "results" / name
    out.write_text(json.dumps({"model": label, "base_macs_per_token": base_macs, "head_macs_per_token": head_macs,
                               "weight_bytes_per_step": weight_bytes, "step": {"adapters": args.adapters,
                                                                               "tokens": args.tokens},
                               "families": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
