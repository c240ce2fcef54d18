"""glibc malloc settings for serving on CPU, applied in every vLLM process by the plugin (TENFOLD_CPU_MALLOC=0: off).

glibc returns freed blocks of a few MB to the operating system (mmap for large blocks, heap trimming for the rest),
so every step that allocates activations of that size again page-faults them in, zero-filled, page by page: on the
2-core benchmark machine that cost the base model a fifth of its decode throughput, and tenfold's applies (bat's
block-transformed inputs are a few MB per layer call) more. A fixed mmap threshold and a high trim threshold keep
such blocks in the process's heap for reuse, which is what the caching allocators recommended for CPU inference
(jemalloc, tcmalloc) do. Memory already freed is then held by the process (up to the trim threshold) instead of
being returned at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

ENV = "TENFOLD_CPU_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 64 << 20   # blocks below 64 MiB come from the heap (glibc's dynamic threshold caps at 32 MiB)
TRIM_THRESHOLD = 512 << 20  # the heap's free top is returned to the OS only beyond 512 MiB

logger = logging.getLogger("vllm.tenfold")


def tune_malloc() -> bool:
    """Set the thresholds when this process runs on glibc and the setting is not off; whether they were set."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        logger.warning("tenfold: glibc refused the CPU malloc settings; serving with its defaults")
    return done
