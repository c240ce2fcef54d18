"""Stand-in for `engine.loader.recorded_facts` until it lands: the facts of the adapter version now at `path` if a
load or check in this process validated it (found in the loader's cache), else None. Never reads an adapter."""

from __future__ import annotations

from pathlib import Path


def recorded_facts(path, spec, *, tensor_parallel_size: int = 1):
    from ..adapters.checkpoint import fingerprint
    from ..engine import loader

    directory = Path(path)
    try:
        resolved, version = str(directory.resolve()), fingerprint(directory)
    except OSError:
        return None
    with loader._lock:
        validated = any(k[1:] == (resolved, version, spec) for k in loader._cache)
    if not validated:
        return None
    try:
        return loader.adapter_facts(path, spec, tensor_parallel_size=tensor_parallel_size)
    except Exception:  # evicted and rewritten meanwhile: not recorded after all
        return None
