"""tenfold's execution path, chosen per process by the TENFOLD_MODE environment variable (default: native).

- native: tenfold's own layer wrappers keep every adapter's factors compact per slot and apply them on the fly;
  every family, including the ones with no LoRA form (bat, loretta_adp).
- convert: adapters with an exact LoRA form are converted to LoRA tensors at load and run on vLLM's LoRA kernels.
"""

from __future__ import annotations

import os

MODES = ("native", "convert")
ENV = "TENFOLD_MODE"


def execution_mode() -> str:
    mode = os.environ.get(ENV, "native").strip().lower() or "native"
    if mode not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not a tenfold execution mode: use one of {', '.join(MODES)}")
    return mode
