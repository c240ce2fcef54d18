"""An in-process vLLM `LLM` under a chosen TENFOLD_MODE, for module-scoped test fixtures."""

from __future__ import annotations

import contextlib
import gc
import os


@contextlib.contextmanager
def offline_engine(mode: str, env: dict[str, str] | None = None, **llm_args):
    """The engine with TENFOLD_MODE=mode and `env` set (read by its processes and by this process's request checks);
    shut down, and the previous environment restored, afterwards."""
    from vllm import LLM

    settings = {"TENFOLD_MODE": mode, **(env or {})}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        llm = LLM(**llm_args)
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
