"""Output-token throughput of one vLLM engine serving many adapters: the bare base model, vLLM's own LoRA path,
tenfold's convert path and tenfold's native path, on the same prompts and model.

    .venv/bin/python benchmarks/native_throughput.py --modes base,vllm-lora,native:lorta

Modes: `base` (LoRA disabled), `vllm-lora` (PEFT LoRA r=16 directories on vLLM's stock LoRA path),
`native:<family>` and `convert:<family>` (tenfold-format adapters with TENFOLD_MODE=native / convert). Each mode
runs in a fresh subprocess (the mode is per process, engines are heavy); a failing mode is recorded, not fatal.
Every request batch is submitted in one `llm.generate` call, adapters round-robin over the requests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tenfold.bench.report import error_lines
from tenfold.bench.workload import (BENCH_MODEL, CPU_ENV, FAMILY_SETTINGS, adapter_info, build_model, machine_info,
                                    synth_adapters, vllm_lora_rank)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODES = ("base,vllm-lora,native:lorta,native:miss,native:lora,native:loretta_rep,native:loretta_adp,"
                 "native:bat")
# bfloat16 is the setting, but a CPU without AVX-512 (this machine: AVX2 only) emulates bf16 GEMMs: the base
# model runs ~10x slower than in float32 and vLLM's LoRA ops in bf16 time out (RPC timeout after minutes per step).
DTYPES = ("float32", "bfloat16")
CHILD_TIMEOUT_S = 3600


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=DEFAULT_MODES, type=parse_modes,
                        help="comma list of base, vllm-lora, native:<family>, convert:<family>")
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters, round-robin over the requests")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls after one untimed warm-up")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="served model dtype; adapters are stored in it too, as they would be shipped")
    parser.add_argument("--max-loras", type=int, default=None, help="adapter slots (default: --adapters)")
    parser.add_argument("--in-process", action="store_true",
                        help="run vLLM's engine core inside the benchmark process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/native_throughput_cpu.json")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tenfold/bench").expanduser())
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run one mode from this spec file
    args = parser.parse_args(argv)
    args.max_loras = args.max_loras or args.adapters
    return args


def parse_modes(text: str) -> list[str]:
    from tenfold.adapters import FAMILIES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    for mode in modes:
        path, _, family = mode.partition(":")
        if mode not in ("base", "vllm-lora") and not (path in ("native", "convert") and family in FAMILIES):
            raise argparse.ArgumentTypeError(f"unknown mode {mode!r}: expected base, vllm-lora, native:<family> or "
                                             f"convert:<family> with a family in {', '.join(FAMILIES)}")
    return modes


def mode_family(mode: str) -> str | None:
    """The adapter family a mode serves (vllm-lora serves plain LoRA), None for the base model."""
    if mode == "base":
        return None
    return "lora" if mode == "vllm-lora" else mode.partition(":")[2]


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(count)]  # ids 0-2 are special


# --- one mode (child process) ----------------------------------------------------------------------------------------

def run_mode(spec: dict) -> dict:
    """Start one engine, warm it up with one untimed batch, then time `repeats` identical batches."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    engine_args = dict(model=spec["model"], dtype=spec["dtype"], block_size=32, max_model_len=spec["max_model_len"],
                       max_num_seqs=len(spec["prompts"]), enforce_eager=True, seed=0,
                       enable_prefix_caching=False)  # repeats resend the same prompts: no cached prefills
    requests = None
    if spec["adapters"]:
        lora_rank = vllm_lora_rank(spec["rank"])
        engine_args.update(enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=lora_rank,
                           max_cpu_loras=max(spec["max_loras"], len(spec["adapters"])))
        loras = [LoRARequest(Path(p).name, i + 1, p) for i, p in enumerate(spec["adapters"])]
        requests = [loras[i % len(loras)] for i in range(len(spec["prompts"]))]
    start = time.perf_counter()
    llm = LLM(**engine_args)
    engine_start_s = time.perf_counter() - start

    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]

    def timed_batch() -> tuple[float, int]:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    try:
        timed_batch()  # warm-up: loads every adapter into its slot, first-call allocations
        runs = [timed_batch() for _ in range(spec["repeats"])]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"engine_start_s": engine_start_s, "engine_args": engine_args, "output_tokens": runs[0][1],
            "seconds": [s for s, _ in runs], "tok_s": [tokens / s for s, tokens in runs]}


def child_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    try:
        result = run_mode(spec)
    except Exception as e:  # noqa: BLE001 - any failure is this mode's result, reported by the parent
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(spec["result_path"]).write_text(json.dumps(result))


def run_in_subprocess(mode: str, spec: dict, log_path: Path) -> dict:
    """Run one mode in a fresh interpreter; its vLLM output goes to `log_path`."""
    env = {**CPU_ENV, **os.environ}  # the caller's settings win
    if spec["in_process"]:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if mode_family(mode) is not None:
        env["TENFOLD_MODE"] = "native" if mode.startswith("native:") else "convert"
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}))
        with open(log_path, "w") as log:
            # own session: on a timeout the child's whole process group (vLLM's engine core too) is stopped
            child = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                child.wait(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
        result = json.loads(result_path.read_text()) if result_path.is_file() else {"error": "child process died"}
    if "error" in result:
        result["log_errors"] = error_lines(log_path)
    return result


# --- report ----------------------------------------------------------------------------------------------------------

def summarize(mode: str, result: dict, info: dict) -> dict:
    row = {"mode": mode, "family": info.get("family"), "rank": info.get("rank"),
           "adapter_bytes": info.get("adapter_bytes"), **result}
    if "tok_s" in result:
        row.update(tok_s_median=statistics.median(result["tok_s"]), tok_s_min=min(result["tok_s"]),
                   tok_s_max=max(result["tok_s"]))
    return row


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_base = median tok/s over the base model's median, when base ran."""
    base = next((r.get("tok_s_median") for r in rows if r["mode"] == "base"), None)
    for row in rows:
        row["ratio_to_base"] = row["tok_s_median"] / base if base and "tok_s_median" in row else None


def format_table(rows: list[dict]) -> str:
    lines = [f"{'mode':<22}{'tok/s median [min-max]':<28}{'vs base':>8}  {'start s':>7}  {'adapter bytes':>13}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['mode']:<22}FAILED: {row['error'].splitlines()[0][:200]}")
            error_type = row["error"].split(":")[0]
            cause = next((line for line in row.get("log_errors", []) if error_type not in line), None)
            if cause:  # e.g. EngineDeadError: the root cause was raised in the engine process
                lines.append(f"{'':<22}log: {cause[:200]}")
            continue
        ratio = f"{row['ratio_to_base']:.2f}x" if row["ratio_to_base"] is not None else "-"
        spread = f"{row['tok_s_median']:.1f} [{row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}]"
        size = f"{row['adapter_bytes']:,}" if row["adapter_bytes"] is not None else "-"
        lines.append(f"{row['mode']:<22}{spread:<28}{ratio:>8}  {row['engine_start_s']:>7.1f}  {size:>13}")
    return "\n".join(lines)


def main(args) -> None:
    from tqdm import tqdm

    # one folder per run, so concurrent or later runs never overwrite the logs a result points to
    log_dir = args.cache_dir / "logs" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    print("building the model and adapters (cached after the first run) ...", file=sys.stderr)
    model_dir = build_model(args.cache_dir)
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    prompts = random_prompts(args.requests, args.prompt_len, vocab_size)
    base_spec = {"model": str(model_dir), "prompts": prompts, "output_len": args.output_len, "repeats": args.repeats,
                 "max_model_len": args.prompt_len + args.output_len, "max_loras": args.max_loras, "dtype": args.dtype,
                 "in_process": args.in_process}

    rows = []
    progress = tqdm(args.modes, desc="modes", unit="mode", file=sys.stderr)
    for mode in progress:
        progress.set_postfix_str(mode)
        family = mode_family(mode)
        spec, info = {**base_spec, "adapters": [], "rank": None}, {}
        if family is not None:
            paths = synth_adapters(family, args.adapters, model_dir, args.cache_dir, args.dtype,
                                   lora_form=mode == "vllm-lora")
            info = adapter_info(paths[0])
            spec.update(adapters=[str(p) for p in paths], rank=info["rank"])
        log_path = log_dir / f"{mode.replace(':', '_')}.log"
        load_before = os.getloadavg()[0]  # another job on the machine skews every number: keep the evidence
        row = summarize(mode, run_in_subprocess(mode, spec, log_path), info)
        row.update(log=str(log_path), load_avg_1min_before=load_before)
        rows.append(row)
        outcome = row["error"].splitlines()[0][:120] if "error" in row else f"{row['tok_s_median']:.1f} tok/s"
        tqdm.write(f"{mode}: {outcome}", file=sys.stderr)
    add_ratios(rows)

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable, *sys.argv]), "machine": machine_info(),
              "settings": {"model": BENCH_MODEL, "engine_core_in_process": args.in_process,
                           "served_dtype": args.dtype, "adapter_dtype": args.dtype,
                           "families": FAMILY_SETTINGS, "adapters": args.adapters, "requests": args.requests,
                           "prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
                           "max_loras": args.max_loras},
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(f"results written to {args.out}")


if __name__ == "__main__":  # mandatory: vLLM spawns processes that re-import this module
    arguments = parse_args()
    if arguments.child:
        child_main(arguments.child)
    else:
        main(arguments)
