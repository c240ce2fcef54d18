"""An in-process vLLM `LLM` under a chosen TENFOLD_MODE, for module-scoped test fixtures."""

from __future__ import annotations

import contextlib
import gc
import os


@contextlib.contextmanager
def offline_engine(mode: str, **llm_args):
    """The engine with TENFOLD_MODE=mode (read by its processes and by this process's request checks); shut down,
    and the previous mode restored, afterwards."""
    from vllm import LLM

    previous = os.environ.get("TENFOLD_MODE")
    os.environ["TENFOLD_MODE"] = mode
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
        if previous is None:
            os.environ.pop("TENFOLD_MODE", None)
        else:
            os.environ["TENFOLD_MODE"] = previous
