"""`tenfold bench`: what serving N adapters costs, side by side with the bare base model and vLLM's own LoRA path.

One invocation runs, on the same model, prompts, lengths, adapter popularity and seeds:
- `base`: the base model, LoRA disabled (the ceiling);
- `native`: tenfold's native path (TENFOLD_MODE=native), every family;
- `convert`: tenfold's compatibility path (each adapter converted in memory to its exact LoRA form, vLLM's kernels);
- `vllm-lora`: vLLM's stock LoRA path serving PEFT LoRA directories written by `tenfold convert` (the same
  exact LoRA form at the equivalent rank), for families that have one.
Each run is its own process (`tenfold.bench.child`); a failing run is recorded with its error, not fatal.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..engine.adapter_memory import ENV as MEMORY_ENV, parse_gib
from . import report
from .workload import (CPU_ENV, DEFAULT_MODEL, RANDOM_MODEL, Lengths, Popularity, adapter_dir_entries, adapter_info,
                       distinct_used, machine_info, make_requests, model_dtype, resolve_model, synth_adapters,
                       user_adapters, vllm_lora_rank)

MODES = ("base", "native", "convert", "vllm-lora")
RUN_TIMEOUT_S = 3600


def parse_arrival(text: str) -> float | None:
    """'offline' -> None; 'poisson:RATE' -> RATE requests/s."""
    if text == "offline":
        return None
    kind, _, rate = text.partition(":")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if kind != "poisson" or value <= 0:
        raise ValueError(f"arrival {text!r}: expected 'offline' or 'poisson:RATE' with RATE > 0 (requests/s)")
    return value


DIR_PREFIX = "dir:"  # the "family" of runs over --adapter-dir: dir:<directory name>


def plan_runs(args, families, exact_lora: dict[str, bool]) -> list[dict]:
    """Every (mode, family, number of adapters) to run, in groups of one family and count; with base among the
    modes, every group opens with a run of the base model, and each run's ratio to base is taken against its own
    group's base run (minutes apart, not the length of the whole plan: a shared machine drifts). Convert and
    vllm-lora only serve families whose update has an exact LoRA form (bat and loretta_adp have none); exact_lora
    tells it per family."""
    runs, group = [], 0
    for count in args.adapters:
        for family in families:
            modes = [m for m in args.modes if m != "base" and (m not in ("convert", "vllm-lora") or exact_lora[family])]
            if not modes:
                continue
            if "base" in args.modes:
                runs.append({"mode": "base", "family": None, "num_adapters": 0, "group": group})
            runs += [{"mode": m, "family": family, "num_adapters": count, "group": group} for m in modes]
            group += 1
    if not runs and args.modes == ["base"]:
        runs.append({"mode": "base", "family": None, "num_adapters": 0, "group": 0})
    return runs


def run_child(spec: dict, log_path: Path) -> dict:
    """One run in a fresh interpreter; its vLLM output goes to `log_path`."""
    env = {**CPU_ENV, **os.environ}  # the caller's settings win
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec["arrival"] == "offline" else "1"
    if spec["mode"] != "base":
        env["TENFOLD_MODE"] = "native" if spec["mode"] == "native" else "convert"
    if spec.get("adapter_memory"):
        env[MEMORY_ENV] = repr(spec["adapter_memory"])
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path), "log_path": str(log_path)}))
        with open(log_path, "w") as log:
            # own session: on a timeout the whole process group (engine, server) is stopped
            child = subprocess.Popen([sys.executable, "-m", "tenfold.bench.child", str(spec_path)], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                child.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return {"error": f"timed out after {RUN_TIMEOUT_S} s"}
        result = json.loads(result_path.read_text()) if result_path.is_file() else {
            "error": f"the run's process died (exit code {child.returncode}); see {log_path}"}
    if "error" in result:
        result["log_errors"] = report.error_lines(log_path)
    return result


def main(args) -> int:
    from tqdm import tqdm
    from transformers import AutoConfig

    if args.replicas:
        from . import cluster

        try:
            cluster.adapter_mode(args.modes)
        except ValueError as e:
            raise SystemExit(f"tenfold bench: {e}") from None
        return cluster.main(args)
    if not args.no_plots:
        report.require_matplotlib()
    rate = parse_arrival(args.arrival)
    families = args.families
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)

    model_dir = resolve_model(args.model, args.cache_dir)
    if args.dtype == "auto":
        args.dtype = model_dtype(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    if args.adapter_dir is not None:  # the user's adapters instead of synthetic ones
        families = [DIR_PREFIX + args.adapter_dir.name]
        exact_lora = {families[0]: directory_has_exact_lora(args.adapter_dir, model_dir, max(args.adapters))}
    else:
        from ..adapters import FAMILIES

        exact_lora = {f: FAMILIES[f].has_exact_lora for f in families}
    runs = plan_runs(args, families, exact_lora)
    if not runs:
        raise SystemExit("tenfold bench: nothing to run: the chosen modes serve none of the chosen families")
    rows = []
    base_of_group: dict[tuple[int, int], float] = {}  # (round, group) -> that base run's median tok/s
    # rounds run the whole plan again (base, then every mode), so slow drifts of a shared machine hit every mode
    progress = tqdm([(r, run) for r in range(args.rounds) for run in runs], desc="bench", unit="run", file=sys.stderr)
    for round_index, run in progress:
        label = run["mode"] if run["mode"] == "base" else f"{run['mode']}:{run['family']}@{run['num_adapters']}"
        progress.set_postfix_str(label)
        requests = make_requests(args.requests, run["num_adapters"], args.popularity, args.prompt_len,
                                 args.output_len, vocab_size, rate, args.seed)
        paths, info = [], {}
        if run["family"] is not None:
            lora_form = run["mode"] == "vllm-lora"
            if run["family"].startswith(DIR_PREFIX):
                paths = user_adapters(args.adapter_dir, run["num_adapters"], model_dir, args.cache_dir,
                                      lora_form=lora_form, progress=True)
            else:
                paths = synth_adapters(run["family"], run["num_adapters"], model_dir, args.cache_dir, args.dtype,
                                       lora_form=lora_form, progress=True)
            # synthetic adapters of one run share their shapes: the first tells; a user's directory may mix
            info = adapter_info(paths if run["family"].startswith(DIR_PREFIX) else paths[:1])
        used = distinct_used(requests)
        max_num_seqs = min(args.requests, args.max_num_seqs)
        spec = {**run, "arrival": args.arrival, "model": str(model_dir), "dtype": args.dtype, "seed": args.seed,
                "requests": requests, "repeats": args.repeats, "adapters": [str(p) for p in paths],
                "max_model_len": args.prompt_len.high + args.output_len.high, "max_num_seqs": max_num_seqs,
                "max_loras": args.max_loras or max(1, min(used, max_num_seqs)),
                "max_lora_rank": vllm_lora_rank(info.get("rank") or 1),
                "load_sample": min(args.load_sample, len(paths)), "enforce_eager": args.enforce_eager,
                "adapter_memory": args.adapter_memory}
        load_before = os.getloadavg()[0]  # another job on the machine skews every number: keep the evidence
        suffix = f"_round{round_index + 1}" if args.rounds > 1 else ""
        result = run_child(spec, log_dir / f"{label.replace(':', '_').replace('@', '_')}{suffix}.log")
        row = next((r for r in rows if r["label"] == label), None)
        if row is None:
            row = {k: v for k, v in run.items() if k != "group"}
            row.update(label=label, distinct_adapters_used=used, max_loras=spec["max_loras"], **info, rounds=[],
                       paired_ratios=[])
            rows.append(row)
        row["rounds"].append({**result, "load_avg_1min_before": load_before})
        if "tok_s" in result:
            median = statistics.median(result["tok_s"])
            if run["mode"] == "base":
                base_of_group[round_index, run["group"]] = median
            elif (round_index, run["group"]) in base_of_group:
                row["paired_ratios"].append(median / base_of_group[round_index, run["group"]])
        tqdm.write(f"{label} (round {round_index + 1}): {report.one_line(report.summarize(row, result))}",
                   file=sys.stderr)
    rows = [report.summarize({k: v for k, v in row.items() if k != "rounds"}, report.merge_rounds(row["rounds"]))
            for row in rows]
    report.add_ratios(rows)

    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join(["tenfold", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else
               shlex.join(sys.argv),
               "machine": machine_info(),
               "settings": {"model": str(model_dir), "dtype": args.dtype, "families": families,
                            "adapter_dir": str(args.adapter_dir) if args.adapter_dir else None,
                            "adapters": args.adapters, "modes": args.modes, "popularity": str(args.popularity),
                            "arrival": args.arrival, "requests": args.requests, "prompt_len": str(args.prompt_len),
                            "output_len": str(args.output_len), "repeats": args.repeats, "rounds": args.rounds,
                            "seed": args.seed},
               "results": rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report.format_table(rows))
    written = [args.out / "results.json"]
    if not args.no_plots:
        written += report.plot(rows, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any("error" in row for row in rows) else 0


def directory_has_exact_lora(adapter_dir: Path, model_dir: Path, count: int) -> bool:
    """Whether every adapter a run would use (the first `count` of the directory) has an exact LoRA form; each is
    read and validated against the model here, so a bad adapter stops the benchmark before any engine starts."""
    from ..adapters import AdapterError, ModelSpec, load_adapter

    spec = ModelSpec.from_pretrained(model_dir)
    try:
        paths = adapter_dir_entries(adapter_dir)
        if count > len(paths):
            raise ValueError(f"--adapters {count}, but {adapter_dir} holds {len(paths)} adapter directories")
        return all(load_adapter(p, spec).has_exact_lora for p in paths[:count])
    except (ValueError, AdapterError) as e:
        raise SystemExit(f"tenfold bench: {e}") from None


def cluster_routings(text: str) -> list[str]:
    from .cluster import parse_routings

    return parse_routings(text)


def _argument(parse):
    """An argparse type from a parser raising ValueError: argparse prints our message, not a generic one."""
    import argparse

    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def add_arguments(parser) -> None:
    from ..adapters import FAMILIES

    def families(text):
        names = [f.strip() for f in text.split(",") if f.strip()]
        unknown = [f for f in names if f not in FAMILIES]
        if unknown or not names:
            raise ValueError(f"unknown families {unknown}: choose from {', '.join(FAMILIES)}")
        return names

    def modes(text):
        names = [m.strip() for m in text.split(",") if m.strip()]
        if not names or any(m not in MODES for m in names):
            raise ValueError(f"modes {text!r}: choose from {', '.join(MODES)}")
        return names

    def arrival(text):
        parse_arrival(text)
        return text

    def counts(text):
        values = [int(c) for c in text.split(",")]
        if not values or any(v < 1 for v in values):
            raise ValueError("adapter counts must be >= 1")
        return values

    parser.add_argument("--adapter-dir", type=Path,
                        help="serve your own adapters: every sub-directory of DIR (any tenfold format, families may "
                             "mix), the first N by name for each --adapters N; --families is then ignored "
                             "(default: synthetic adapters, random non-zero factors, of --families)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a HuggingFace model directory; or a model name tenfold fetches once (`tenfold model "
                             f"list`; default: {DEFAULT_MODEL}, SmolLM2-135M-Instruct, bf16); or {RANDOM_MODEL} (a "
                             f"random-weight model, hidden 512, 8 layers, fp32, built into --cache-dir)")
    parser.add_argument("--families", type=_argument(families), default=["lorta"],
                        help="comma list (default: lorta)")
    parser.add_argument("--adapters", type=_argument(counts), default=[32],
                        help="numbers of distinct adapters, comma list for a sweep (default: 32)")
    parser.add_argument("--modes", type=_argument(modes), default=list(MODES),
                        help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--popularity", type=_argument(Popularity.parse), default=Popularity(),
                        help="uniform or zipf:ALPHA (default: uniform)")
    parser.add_argument("--arrival", default="offline", type=_argument(arrival),
                        help="offline (one batch) or poisson:RATE (requests/s, against a tenfold serve process)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=_argument(Lengths.parse), default=Lengths(32, 32),
                        help="N or LO-HI tokens")
    parser.add_argument("--output-len", type=_argument(Lengths.parse), default=Lengths(64, 64),
                        help="N or LO-HI tokens (ignore_eos: always generated in full)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode after one warm-up")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole plan this many times, interleaving the modes (each round a fresh engine "
                             "per mode); summaries pool the repeats of every round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="served dtype; adapters are stored in it too (default auto: the dtype the model is "
                             "saved in, the one users serve it in; note that CPUs without AVX-512 emulate bf16 GEMMs)")
    parser.add_argument("--max-loras", type=int, help="adapter slots (default: distinct adapters per batch)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every mode eagerly (default: as vLLM runs it, compiled where it compiles: the base "
                             "model and tenfold's native mode)")
    parser.add_argument("--adapter-memory", type=parse_gib, metavar="GIB",
                        help="native mode's adapter memory budget, as `tenfold serve --adapter-memory`")
    parser.add_argument("--load-sample", type=int, default=32, help="adapters whose hot-load latency is timed")
    replicas = parser.add_argument_group(
        "replicas (the ray extra): adapter affinity across `tenfold serve --replicas N` engines on Ray Serve")
    replicas.add_argument("--replicas", type=int, default=0, metavar="N",
                          help="measure N replicas behind one ingress instead of one engine per mode: each --routing "
                               "as a fresh cluster on the same requests, closed loop (default 0: off)")
    replicas.add_argument("--routing", type=_argument(cluster_routings), default=["single", "affinity", "random"],
                          help="comma list of single (one replica), affinity (routed by adapter), random (routed "
                               "without affinity) (default: all three)")
    replicas.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    replicas.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica (default 1)")
    replicas.add_argument("--replica-max-ongoing", type=int, default=32, metavar="N",
                          help="requests Serve sends one replica at once (default 32)")
    replicas.add_argument("--affinity-timeout", type=float, default=1.0, metavar="S",
                          help="Serve's matching timeout, as `tenfold serve --affinity-timeout` (default 1.0)")
    replicas.add_argument("--max-cpu-loras", type=int, default=16,
                          help="adapters each replica holds in its host cache, Serve's per-replica model count "
                               "(default 16)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results.json, plots and logs")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tenfold/bench").expanduser(),
                        help="the random benchmark model and synthetic adapters, reused across runs (fetched models "
                             "live in `tenfold model fetch`'s cache)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (they need matplotlib)")
