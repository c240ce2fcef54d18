"""Adapter affinity across replicas: `tenfold serve --replicas N` under Zipf traffic over many adapters.

For each configuration (one replica; two with affinity; two with random routing) it starts a cluster, sends
--requests completions with --concurrency in flight (closed loop), adapters drawn Zipf(--alpha) over --adapters
synthetic adapters, and reports from the response headers: the share of requests served by a replica that already
held their adapter (x-tenfold-adapter-loaded: 0), adapter loads per 1,000 requests, output tok/s, and how requests
spread over the replicas.

    python benchmarks/cluster_affinity.py --model smollm2 --family lora --adapters 64 --requests 512 \\
        --out benchmarks/results/cluster_affinity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from tenfold.bench.workload import Lengths, Popularity, make_requests, model_dtype, resolve_model, synth_adapters

CONFIGS = {"1 replica": (1, True), "2 replicas affinity": (2, True), "2 replicas random": (2, False)}
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(args, model: Path, root: Path, replicas: int, affinity: bool, log: Path):
    port = free_port()
    argv = [sys.executable, "-m", "tenfold.server.cli", "serve", str(model), "--replicas", str(replicas),
            "--replica-cpus", str(args.replica_cpus), "--port", str(port), "--adapter-root", str(root),
            "--replica-max-ongoing", str(args.replica_max_ongoing), "--served-model-name", "base",
            "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras), "--max-lora-rank", "64",
            "--max-model-len", "512", "--block-size", "32", "--dtype", args.dtype, "--no-enable-prefix-caching",
            "--replica-log-dir", str(log.parent / f"replicas-{replicas}-{int(affinity)}")]
    if not affinity:
        argv.append("--no-affinity")
    process = subprocess.Popen(argv, env={**os.environ, **CPU_ENV}, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the cluster exited during start-up; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(2)
    process.kill()
    raise TimeoutError(f"the cluster did not start; see {log}")


async def drive(url: str, requests: list[dict], names: list[str], concurrency: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    records = []

    async def worker(client):
        while not queue.empty():
            request = queue.get_nowait()
            body = {"model": names[request["adapter"]], "prompt": request["prompt"],
                    "max_tokens": request["max_tokens"], "temperature": 0.0, "ignore_eos": True}
            response = await client.post(f"{url}/v1/completions", json=body)
            if response.status_code != 200 and not records:
                print(f"first error: {response.status_code} {response.text[:300]}", flush=True)
            records.append({"status": response.status_code, "replica": response.headers.get("x-tenfold-replica"),
                            "loaded": response.headers.get("x-tenfold-adapter-loaded") == "1",
                            "tokens": response.json()["usage"]["completion_tokens"]
                            if response.status_code == 200 else 0})

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = [r for r in records if r["status"] == 200]
    return {"requests": len(records), "errors": len(records) - len(ok), "seconds": round(elapsed, 2),
            "output_tok_s": round(sum(r["tokens"] for r in ok) / elapsed, 1),
            "served_where_resident": round(sum(not r["loaded"] for r in ok) / max(1, len(ok)), 4),
            "loads_per_1000": round(1000 * sum(r["loaded"] for r in ok) / max(1, len(ok)), 1),
            "per_replica": dict(Counter(r["replica"] for r in ok))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--family", default="lora")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", default="32")
    parser.add_argument("--output-len", default="32")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--replica-max-ongoing", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tenfold" / "bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = resolve_model(args.model, args.cache_dir)
    dtype = model_dtype(model) if args.dtype == "auto" else args.dtype
    args.dtype = dtype
    paths = synth_adapters(args.family, args.adapters, model, args.cache_dir, dtype, progress=True)
    root = Path(tempfile.mkdtemp(prefix="tenfold-affinity-"))
    names = []
    for path in paths:  # hard links: the adapter root refuses symlinks that leave it
        shutil.copytree(path, root / path.name, copy_function=os.link)
        names.append(path.name)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    requests = make_requests(args.requests, args.adapters, Popularity("zipf", args.alpha), Lengths.parse(
        args.prompt_len), Lengths.parse(args.output_len), vocab, None, seed=0)
    random.Random(1).shuffle(requests)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": _cpu(), "configs": {}}
    logs = Path(tempfile.mkdtemp(prefix="tenfold-affinity-logs-"))
    for label in args.configs.split(","):
        replicas, affinity = CONFIGS[label]
        process, url = start_cluster(args, model, root, replicas, affinity, logs / f"{label.replace(' ', '_')}.log")
        try:
            asyncio.run(drive(url, requests[:args.concurrency], names, args.concurrency))  # warm-up
            results["configs"][label] = asyncio.run(drive(url, requests, names, args.concurrency))
        finally:
            process.terminate()
            process.wait(timeout=120)
        print(label, json.dumps(results["configs"][label]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"logs: {logs}")
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
