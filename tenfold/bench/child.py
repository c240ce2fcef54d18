"""Runs one `tenfold bench` run in its own interpreter: `python -m tenfold.bench.child SPEC.json`.

A fresh process per run: the execution mode is per process, and an engine's memory is only returned when its
process ends. The result (or the error) is written to the spec's `result_path`; the runner reports failures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        if spec["arrival"] == "offline":
            from .offline import run

            result = run(spec)
        else:
            from .online import run

            result = run(spec, Path(spec["log_path"]))
    except Exception as e:  # noqa: BLE001 - any failure is this run's result, reported by the runner
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(spec["result_path"]).write_text(json.dumps(result))


if __name__ == "__main__":  # mandatory: vLLM spawns processes that re-import the main module
    main(sys.argv[1])
