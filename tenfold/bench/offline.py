"""One offline run of `tenfold bench`: an in-process vLLM engine, adapters hot-loaded one by one (timed), then the
whole request list submitted at once, `repeats` times after an untimed warm-up.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the runner): on a small machine the
front-end process would otherwise compete with the engine's compute threads, and this way the peak memory of the
engine is this process's own.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path


def engine_args(spec: dict) -> dict:
    # every mode runs as vLLM would run it (compiled where it compiles: the base model, tenfold's native mode; vLLM's
    # CPU platform itself turns compilation off for its own LoRA) unless --enforce-eager; results state which ran
    args = dict(model=spec["model"], dtype=spec["dtype"], block_size=32, max_model_len=spec["max_model_len"],
                max_num_seqs=spec["max_num_seqs"], enforce_eager=spec.get("enforce_eager", False), seed=spec["seed"],
                enable_prefix_caching=False,  # repeats resend the same prompts: no cached prefills
                disable_log_stats=False)      # per-request timestamps (time to first token, per output token)
    if spec["adapters"]:
        args.update(enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["max_lora_rank"],
                    max_cpu_loras=max(spec["max_loras"], len(spec["adapters"])))
    return args


def request_latencies(outputs) -> tuple[list[float], list[float]]:
    """Time to first token and time per output token (s) of each finished request, from vLLM's request stats."""
    ttft, tpot = [], []
    for output in outputs:
        stats = output.metrics
        if stats is None or not stats.first_token_ts:
            continue
        ttft.append(stats.first_token_latency)
        generated = len(output.outputs[0].token_ids)
        if generated > 1:
            tpot.append((stats.last_token_ts - stats.first_token_ts) / (generated - 1))
    return ttft, tpot


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    settings = engine_args(spec)
    llm = LLM(**settings)
    engine_start_s = time.perf_counter() - start
    compiled = llm.llm_engine.vllm_config.compilation_config.mode.name != "NONE"
    adapters = [LoRARequest(Path(p).name, i + 1, p) for i, p in enumerate(spec["adapters"])]
    try:
        # hot-load latency: one adapter at a time into the running engine (read, validate, take a slot)
        load_ms = []
        for lora in adapters[: spec["load_sample"]]:
            t0 = time.perf_counter()
            llm.llm_engine.add_lora(lora)
            load_ms.append((time.perf_counter() - t0) * 1e3)

        requests = spec["requests"]
        prompts = [{"prompt_token_ids": r["prompt"]} for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
        loras = [adapters[r["adapter"]] if r["adapter"] is not None else None for r in requests] if adapters else None

        def batch():
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            return time.perf_counter() - t0, outputs

        batch()  # warm-up: every adapter in use reaches a slot, first-call allocations
        seconds, tokens, ttft, tpot = [], [], [], []
        for _ in range(spec["repeats"]):
            elapsed, outputs = batch()
            seconds.append(elapsed)
            tokens.append(sum(len(o.outputs[0].token_ids) for o in outputs))
            run_ttft, run_tpot = request_latencies(outputs)
            ttft += run_ttft
            tpot += run_tpot
        resident = len(llm.llm_engine.list_loras()) if adapters else 0
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"engine_start_s": engine_start_s, "seconds": seconds,
            "tok_s": [t / s for t, s in zip(tokens, seconds)], "req_s": [len(requests) / s for s in seconds],
            "output_tokens": tokens[0], "ttft_s": ttft, "tpot_s": tpot, "load_ms": load_ms,
            "resident_adapters": resident, "enforce_eager": settings["enforce_eager"], "compiled": compiled,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
