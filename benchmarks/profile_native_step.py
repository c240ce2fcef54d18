"""Where a step's time goes: torch's profiler over one batch of an in-process engine (eager by default, so every op is
visible; --compiled: as vLLM runs it, compiled where it compiles), one engine per run.

    .venv/bin/python benchmarks/profile_native_step.py --model ~/.cache/tenfold/models/smollm2-135m-instruct \
        --adapters ~/.cache/tenfold/bench/adapters/lorta-tenfold-128cf8b7ec9a --dtype bfloat16 \
        --out benchmarks/results/profile_smollm2_bf16_lorta.json

Without --adapters the base model runs (LoRA off). Prints the top ops by self CPU time and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapters", type=Path, help="a directory of adapter directories (one per request, cycled)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8, help="output tokens per request in the profiled batch")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--compiled", action="store_true", help="compile as vLLM does (default: eager)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: profiled
    os.environ.setdefault("TENFOLD_MODE", "native")

    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    paths = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file()) if args.adapters else []
    settings = dict(model=str(args.model), dtype=args.dtype, enforce_eager=not args.compiled, max_model_len=256,
                    max_num_seqs=args.requests, block_size=32, seed=0, enable_prefix_caching=False)
    if paths:
        settings.update(enable_lora=True, max_loras=len(paths), max_cpu_loras=len(paths), max_lora_rank=16)
    llm = LLM(**settings)
    loras = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(paths)]
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 40000, (args.prompt_len,), generator=g).tolist()}
               for _ in range(args.requests)]
    requests = [loras[i % len(loras)] for i in range(args.requests)] if loras else None

    def batch(tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        return time.perf_counter() - t0

    batch(2)  # warm-up: adapters into their slots, first-call allocations
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        seconds = batch(args.tokens)
    table = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in table)
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in table[: args.top]]
    result = {"command": "python benchmarks/profile_native_step.py " + " ".join(os.sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "adapters": len(paths), "dtype": args.dtype,
              "compiled": llm.llm_engine.vllm_config.compilation_config.mode.name != "NONE",
              "requests": args.requests, "tokens": args.tokens, "batch_seconds": seconds,
              "self_cpu_ms_total": total / 1e3, "top": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{len(paths)} adapters, {args.dtype}, compiled={result['compiled']}: batch {seconds:.2f} s, profiled self CPU {total / 1e6:.2f} s")
    for row in rows:
        print(f"{row['op'][:60]:<60} {row['calls']:>7} {row['self_cpu_ms']:>10.1f} ms {100 * row['share']:>5.1f}%")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
