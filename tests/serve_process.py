"""Start `tenfold serve` as a subprocess on 127.0.0.1 for the server tests, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--block-size", "32",
               "--served-model-name", "base", "--max-loras", "4", "--max-lora-rank", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tenfold_server(model_dir, log_path, *args, env=None, startup_timeout=240):
    port = free_port()
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", **(env or {})}
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tenfold.server.cli", "serve", str(model_dir), "--port", str(port),
                             *map(str, args), *ENGINE_ARGS], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + startup_timeout
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"tenfold serve did not start:\n{log.read()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "port": port, "process": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
