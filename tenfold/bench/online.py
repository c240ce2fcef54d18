"""One online run of `tenfold bench`: a `tenfold serve` process on the adapters' directory (adapters load by name
on first use), adapters hot-loaded through `/v1/load_lora_adapter` (timed), then requests sent at their Poisson
arrival times through the OpenAI completions API, streamed, so each one gives its time to first token and time per
output token as a client sees them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(spec: dict, port: int) -> list[str]:
    """`tenfold serve` for adapter modes; vLLM's own OpenAI server without LoRA for the bare base model."""
    engine = ["--port", str(port), "--served-model-name", "base", "--dtype", spec["dtype"], "--block-size", "32",
              "--max-model-len", str(spec["max_model_len"]), "--max-num-seqs", str(spec["max_num_seqs"]),
              "--seed", str(spec["seed"]), "--no-enable-prefix-caching"]
    if spec.get("enforce_eager"):
        engine.append("--enforce-eager")
    if not spec["adapters"]:  # the base model as a user serves it: compiled wherever vLLM compiles
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"], *engine]
    return [sys.executable, "-m", "tenfold.cli", "serve", spec["model"], "--grpc-port", "0",
            "--adapter-root", str(Path(spec["adapters"][0]).parent),
            "--mode", "native" if spec["mode"] == "native" else "convert", *engine,
            "--max-loras", str(spec["max_loras"]), "--max-lora-rank", str(spec["max_lora_rank"]),
            "--max-cpu-loras", str(max(spec["max_loras"], len(spec["adapters"])))]


async def wait_ready(session, url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
        try:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"the server was not ready after {READY_TIMEOUT_S} s")


async def one_request(session, url: str, request: dict, model: str, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + request["arrival_s"] - time.perf_counter()))
    body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{model}: HTTP {response.status}: {(await response.text())[:300]}")
        async for raw in response.content:  # server-sent events, one per line
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    return {"sent": sent, "first": first or done, "done": done, "tokens": tokens}


async def load_adapters(session, url: str, paths: list[str]) -> list[float]:
    """Hot-load each adapter into the running server, one at a time; the latency of each (ms)."""
    latencies = []
    for path in paths:
        t0 = time.perf_counter()
        async with session.post(f"{url}/v1/load_lora_adapter",
                                json={"lora_name": Path(path).name, "lora_path": path}) as response:
            if response.status != 200:
                raise RuntimeError(f"loading {path}: HTTP {response.status}: {(await response.text())[:300]}")
        latencies.append((time.perf_counter() - t0) * 1e3)
    return latencies


async def drive(spec: dict, url: str, server: subprocess.Popen) -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await wait_ready(session, url, server)
        load_ms = await load_adapters(session, url, spec["adapters"][: spec["load_sample"]])
        names = [Path(p).name for p in spec["adapters"]]
        model_of = lambda r: names[r["adapter"]] if r["adapter"] is not None else "base"  # noqa: E731
        requests = spec["requests"]
        # warm-up: every adapter in use is loaded once, outside the timed run
        await asyncio.gather(*[one_request(session, url, {**r, "arrival_s": 0.0}, model_of(r), time.perf_counter())
                               for r in requests])
        runs = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            results = await asyncio.gather(*[one_request(session, url, r, model_of(r), start) for r in requests])
            runs.append(results)
        resident = await worker_resident(session, url) if spec["adapters"] else 0
    seconds = [max(r["done"] for r in run) - min(r["sent"] for r in run) for run in runs]
    tokens = [sum(r["tokens"] for r in run) for run in runs]
    return {"seconds": seconds, "tok_s": [t / s for t, s in zip(tokens, seconds)],
            "req_s": [len(run) / s for run, s in zip(runs, seconds)], "output_tokens": tokens[0],
            "ttft_s": [r["first"] - r["sent"] for run in runs for r in run],
            "tpot_s": [(r["done"] - r["first"]) / (r["tokens"] - 1) for run in runs for r in run if r["tokens"] > 1],
            "load_ms": load_ms, "resident_adapters": resident, "enforce_eager": bool(spec.get("enforce_eager")),
            # what vLLM 0.32 decides on CPU (the server runs in another process): compiled unless eager was asked
            # for or vLLM's own LoRA runs (convert, vllm-lora)
            "compiled": not spec.get("enforce_eager") and spec["mode"] in ("base", "native")}


async def worker_resident(session, url: str) -> int:
    """Adapters in the workers' cache, from tenfold's /metrics gauge."""
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tenfold_resident_adapters" and sample.labels.get("tier") == "worker_cache":
                return int(sample.value)
    raise RuntimeError("the server's /metrics has no tenfold_resident_adapters gauge")


def tree_peak_rss(pid: int) -> int:
    """Peak resident memory (VmHWM) summed over a process and its children: the server and its engine core."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            status = Path(f"/proc/{process.pid}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
    except (psutil.Error, OSError, StopIteration):
        return 0
    return total


def run(spec: dict, log_path: Path) -> dict:
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # a server keeps vLLM's default process layout
    start = time.perf_counter()
    with open(log_path, "a") as log:
        server = subprocess.Popen(server_command(spec, port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        result = asyncio.run(drive(spec, f"http://127.0.0.1:{port}", server))
        result["peak_rss_bytes"] = tree_peak_rss(server.pid)
        result["engine_start_s"] = None  # included in the ready wait; not separated for a server
        result["wall_s"] = time.perf_counter() - start
        return result
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
