"""What adapters cost tenfold's native path, measured in one engine: batches without adapters and with 32 distinct
adapters alternate in the same engine, so a shared machine's slow drifts (which move the bare base model's own
throughput by +-15 % within minutes here) hit both sides of every pair alike. Complements `tenfold bench`, whose
ratios compare separate engines minutes apart.

    .venv/bin/python benchmarks/paired_adapter_cost.py [--families lorta,miss] [--pairs 6] \
        [--model random|smollm2|DIR] [--dtype float32|bfloat16] [--compiled]
        # -> benchmarks/results/paired_adapter_cost.json (or --out)

Each family runs in a fresh process (the engine core in-process, like `tenfold bench` offline). The workload is
`tenfold bench`'s: 64 requests x (32 prompt + 64 output) tokens, greedy, ignore_eos, adapters assigned uniformly,
on the random benchmark model in float32 and eager by default (the earlier tables), or `--model smollm2 --dtype
bfloat16 --compiled` (the real model as users serve it, vLLM's CPU compilation on). The engine has LoRA enabled in both halves of a pair; that this costs
nothing by itself (no adapter in the batch: the wrappers return at once) is the `base` vs `native` comparison of
`tenfold bench`, within its noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tenfold.adapters.registry import DECLARATIONS
from tenfold.bench.workload import (CPU_ENV, RANDOM_MODEL, Lengths, Popularity, build_model,
                                    machine_info, make_requests, resolve_model, synth_adapters)

CACHE = Path("~/.cache/tenfold/bench").expanduser()
ADAPTERS, REQUESTS, PROMPT, OUTPUT = 32, 64, 32, 64


def measure(family: str, pairs: int, model_name: str, dtype: str, compiled: bool) -> dict:
    """In this process: one engine, `pairs` pairs of (no adapters, adapters) batches after a warm-up of each."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model = build_model(CACHE) if model_name == RANDOM_MODEL else resolve_model(model_name, CACHE)
    paths = synth_adapters(family, ADAPTERS, model, CACHE, dtype)
    requests = make_requests(REQUESTS, ADAPTERS, Popularity(), Lengths(PROMPT, PROMPT), Lengths(OUTPUT, OUTPUT), 512,
                             None, seed=0)
    loras = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(paths)]
    llm = LLM(model=str(model), dtype=dtype, block_size=32, max_model_len=PROMPT + OUTPUT, max_num_seqs=REQUESTS,
              enforce_eager=not compiled, seed=0, enable_prefix_caching=False, enable_lora=True, max_loras=ADAPTERS,
              max_cpu_loras=ADAPTERS, max_lora_rank=64)  # native slots are sized by each adapter, not by this
    prompts = [{"prompt_token_ids": r["prompt"]} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
    with_adapters = [loras[r["adapter"]] for r in requests]

    def tok_s(lora_requests) -> float:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)

    try:
        tok_s(None), tok_s(with_adapters)  # warm-up: every adapter takes its slot
        without, with_ = [], []
        for _ in range(pairs):
            without.append(tok_s(None))
            with_.append(tok_s(with_adapters))
    finally:
        llm.llm_engine.engine_core.shutdown()
    ratios = [a / b for a, b in zip(with_, without)]
    return {"family": family, "settings": DECLARATIONS[family].bench_settings, "model": str(model), "dtype": dtype,
            "compiled": compiled, "tok_s_without_adapters": without,
            "tok_s_with_adapters": with_, "paired_ratios": ratios, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(DECLARATIONS))
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--model", default=RANDOM_MODEL, help="random (default), smollm2 or a model directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compiled", action="store_true", help="vLLM's CPU compilation on (native mode keeps it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" /
                        "paired_adapter_cost.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one family in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.pairs, args.model, args.dtype, args.compiled)))
        return
    env = {**CPU_ENV, **os.environ, "TENFOLD_MODE": "native", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    rows = []
    for family in args.families.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", family, "--pairs", str(args.pairs), "--model",
                               args.model, "--dtype", args.dtype, *(["--compiled"] if args.compiled else [])],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{family}: the run failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{family:12s} with/without adapters in one engine: median {row['ratio_median']:.3f} "
              f"[{row['ratio_min']:.3f}-{row['ratio_max']:.3f}] over {args.pairs} pairs", flush=True)
        rows.append(row)
    args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "command": " ".join(["python", "benchmarks/paired_adapter_cost.py", *sys.argv[1:]]),
                                    "machine": machine_info(), "adapters": ADAPTERS, "requests": REQUESTS,
                                    "prompt_len": PROMPT, "output_len": OUTPUT, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    main()
