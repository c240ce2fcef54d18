"""Run a server subprocess on 127.0.0.1 for the server tests (`tenfold serve`, or vLLM's own OpenAI server) and
stop it afterwards."""

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
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def gone(pid: int) -> bool:
    """The process has exited (a zombie that its parent has not reaped yet counts as exited)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, seconds: float) -> list[int]:
    """Waits until every process in `pids` has exited or `seconds` passed; the pids still running."""
    deadline = time.monotonic() + seconds
    while (running := [pid for pid in pids if not gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(argv, port: int, log_path, env=None, startup_timeout=240):
    """Start `argv`, wait until http://127.0.0.1:<port>/health answers 200, yield, then terminate."""
    log = open(log_path, "w+")
    proc = subprocess.Popen(list(map(str, argv)), env={**os.environ, **CPU_ENV, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT)
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
                raise RuntimeError(f"server did not start:\n{log.read()[-4000:]}")
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


@contextmanager
def tenfold_server(model_dir, log_path, *args, env=None):
    port = free_port()
    argv = [sys.executable, "-m", "tenfold.cli", "serve", model_dir, "--port", port, *args, *ENGINE_ARGS]
    with running_server(argv, port, log_path, env) as running:
        yield running
