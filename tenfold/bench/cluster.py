"""`tenfold bench --replicas N`: adapter affinity across engine replicas (`tenfold serve --replicas N`, Ray Serve).

Every routing asked for (`--routing`: `single` = one replica, `affinity` = N replicas routed by adapter through
Serve's multiplexing, `random` = N replicas with `--no-affinity`) runs as a fresh cluster on the same requests:
closed loop, `--concurrency` in flight, adapters drawn by `--popularity` over `--adapters` synthetic adapters, in
shuffled order. From the replicas' response headers it reports the share of requests served by a replica that already
held their adapter (`x-tenfold-adapter-loaded: 0`), adapter loads per 1,000 requests, output tokens per second and
how the requests spread over the replicas; ratios are taken against the single replica and the random routing of the
same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from .online import free_port
from .workload import CPU_ENV, adapter_info, machine_info, make_requests, resolve_model, synth_adapters, vllm_lora_rank

ROUTINGS = ("single", "affinity", "random")
START_TIMEOUT_S = 900


def parse_routings(text: str) -> list[str]:
    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names or any(r not in ROUTINGS for r in names):
        raise ValueError(f"routing {text!r}: comma list of {', '.join(ROUTINGS)}")
    return names


def adapter_mode(modes: list[str]) -> str:
    """The serving mode of the replicas: the first adapter mode tenfold serve runs among --modes."""
    for mode in modes:
        if mode in ("native", "convert"):
            return mode
    raise ValueError(f"--replicas serves adapters through tenfold serve: --modes must name native or convert, "
                     f"not only {','.join(modes)}")


def cluster_command(args, model: Path, root: Path, mode: str, replicas: int, affinity: bool, rank: int,
                    port: int, log_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "tenfold.cli", "serve", str(model), "--mode", mode,
            "--replicas", str(replicas), "--replica-cpus", str(args.replica_cpus),
            "--replica-max-ongoing", str(args.replica_max_ongoing), "--affinity-timeout", str(args.affinity_timeout),
            "--replica-log-dir", str(log_dir), "--port", str(port), "--grpc-port", "0", "--adapter-root", str(root),
            "--served-model-name", "base", "--dtype", args.dtype, "--block-size", "32", "--no-enable-prefix-caching",
            "--max-model-len", str(args.prompt_len.high + args.output_len.high), "--seed", str(args.seed),
            "--max-loras", str(args.max_loras or 8), "--max-cpu-loras", str(args.max_cpu_loras),
            "--max-lora-rank", str(rank), "--max-num-seqs", str(min(args.max_num_seqs, args.replica_max_ongoing))]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if not affinity:
        argv.append("--no-affinity")
    return argv


def start(argv: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, env={**CPU_ENV, **os.environ}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the cluster exited with code {process.returncode} during start-up; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(2)
    stop(process)
    raise TimeoutError(f"the cluster was not ready after {START_TIMEOUT_S} s; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to `tenfold serve` alone: it shuts Serve and its local Ray down; the whole group only if it hangs."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def drive(url: str, requests: list[dict], names: list[str], concurrency: int) -> dict:
    """Closed loop: `concurrency` clients, each sending the next request when its last one is answered."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    records: list[dict] = []
    errors: list[str] = []

    async def client_loop(client):
        while not queue.empty():
            request = queue.get_nowait()
            body = {"model": names[request["adapter"]] if request["adapter"] is not None else "base",
                    "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0.0,
                    "ignore_eos": True}
            response = await client.post(f"{url}/v1/completions", json=body)
            ok = response.status_code == 200
            if not ok:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            records.append({"ok": ok, "replica": response.headers.get("x-tenfold-replica"),
                            "loaded": response.headers.get("x-tenfold-adapter-loaded") == "1",
                            "tokens": response.json()["usage"]["completion_tokens"] if ok else 0})

    async with httpx.AsyncClient(timeout=600) as client:
        start_time = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start_time
    ok = [r for r in records if r["ok"]]
    return {"requests": len(records), "errors": len(errors), "first_errors": errors[:3], "seconds": round(elapsed, 2),
            "output_tok_s": round(sum(r["tokens"] for r in ok) / elapsed, 1),
            "served_where_resident": round(sum(not r["loaded"] for r in ok) / max(1, len(ok)), 4),
            "loads_per_1000": round(1000 * sum(r["loaded"] for r in ok) / max(1, len(ok)), 1),
            "per_replica": dict(Counter(r["replica"] for r in ok))}


def adapter_root(paths: list[Path]) -> Path:
    """One directory holding the run's adapters by name, as `--adapter-root` (hard links: the root refuses symlinks
    that leave it)."""
    root = Path(tempfile.mkdtemp(prefix="tenfold-bench-cluster-"))
    for path in paths:
        shutil.copytree(path, root / path.name, copy_function=os.link)
    return root


def format_table(rows: list[dict]) -> str:
    lines = ["| routing | replicas | family | adapters | tok/s | x single | x random | served where resident | "
             "loads / 1000 req | requests per replica | errors |", "|" + "---|" * 11]
    for row in rows:
        r = row.get("result", {})
        if "error" in row:
            lines.append(f"| {row['routing']} | {row['replicas']} | {row['family']} | {row['num_adapters']} | "
                         f"error: {row['error'][:80]} |" + " |" * 6)
            continue
        spread = ", ".join(str(n) for _, n in sorted(r["per_replica"].items(), key=lambda kv: str(kv[0])))
        ratio = lambda key: f"{row[key]:.2f}x" if row.get(key) else "-"  # noqa: E731
        lines.append(f"| {row['routing']} | {row['replicas']} | {row['family']} | {row['num_adapters']} | "
                     f"{r['output_tok_s']:.1f} | {ratio('x_single')} | {ratio('x_random')} | "
                     f"{100 * r['served_where_resident']:.1f}% | {r['loads_per_1000']:.0f} | {spread} | "
                     f"{r['errors']} |")
    return "\n".join(lines)


def add_ratios(rows: list[dict]) -> None:
    for row in rows:
        group = [r for r in rows if r["family"] == row["family"] and r["num_adapters"] == row["num_adapters"]
                 and "result" in r]
        tok_s = {r["routing"]: r["result"]["output_tok_s"] for r in group}
        if "result" in row:
            for key, other in (("x_single", "single"), ("x_random", "random")):
                if other in tok_s and other != row["routing"]:
                    row[key] = row["result"]["output_tok_s"] / tok_s[other]


def main(args) -> int:
    from tqdm import tqdm
    from transformers import AutoConfig

    from .workload import model_dtype

    mode = adapter_mode(args.modes)
    model_dir = resolve_model(args.model, args.cache_dir)
    if args.dtype == "auto":
        args.dtype = model_dtype(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    plan = [(family, count, routing) for count in args.adapters for family in args.families
            for routing in args.routing]
    rows = []
    progress = tqdm(plan, desc="bench (replicas)", unit="cluster", file=sys.stderr)
    for family, count, routing in progress:
        replicas = 1 if routing == "single" else args.replicas
        label = f"{routing}:{family}@{count}"
        progress.set_postfix_str(label)
        paths = synth_adapters(family, count, model_dir, args.cache_dir, args.dtype, progress=True)
        rank = vllm_lora_rank(adapter_info(paths[:1]).get("rank") or 1)
        requests = make_requests(args.requests, count, args.popularity, args.prompt_len, args.output_len,
                                 vocab_size, None, args.seed)
        random.Random(args.seed + 1).shuffle(requests)  # popular adapters spread over the run, not in a burst
        root = adapter_root(paths)
        row = {"routing": routing, "replicas": replicas, "family": family, "num_adapters": count,
               "load_avg_1min_before": os.getloadavg()[0]}
        run_logs = log_dir / label.replace(":", "_").replace("@", "_")
        run_logs.mkdir(exist_ok=True)
        argv = cluster_command(args, model_dir, root, mode, replicas, routing != "random", rank, free_port(),
                               run_logs / "replicas")
        try:
            process, url = start(argv, run_logs / "cluster.log")
            try:
                names = [p.name for p in paths]
                asyncio.run(drive(url, requests[:args.concurrency], names, args.concurrency))  # warm-up
                row["result"] = asyncio.run(drive(url, requests, names, args.concurrency))
            finally:
                stop(process)
        except (RuntimeError, TimeoutError, OSError) as e:
            row["error"] = str(e)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append(row)
        tqdm.write(f"{label}: {json.dumps(row.get('result', row.get('error')))}", file=sys.stderr)
    add_ratios(rows)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join(["tenfold", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else
               shlex.join(sys.argv),
               "machine": machine_info(),
               "settings": {"model": str(model_dir), "dtype": args.dtype, "mode": mode, "families": args.families,
                            "adapters": args.adapters, "popularity": str(args.popularity), "requests": args.requests,
                            "concurrency": args.concurrency, "prompt_len": str(args.prompt_len),
                            "output_len": str(args.output_len), "replicas": args.replicas,
                            "replica_cpus": args.replica_cpus, "replica_max_ongoing": args.replica_max_ongoing,
                            "affinity_timeout_s": args.affinity_timeout, "max_loras": args.max_loras or 8,
                            "max_cpu_loras": args.max_cpu_loras, "seed": args.seed},
               "results": rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {args.out / 'results.json'}")
    return 1 if any("error" in row or row["result"]["errors"] for row in rows) else 0
