"""The Triton kernels against their torch reference ops under Triton's interpreter, on CPU (no GPU needed).

Triton decides between compiling and interpreting its own library functions (tl.minimum, tl.sigmoid, ...) when it is
first imported, and a test session has imported it long before this file: the cases (tests/triton_kernel_cases.py)
run in a fresh process started with TRITON_INTERPRET=1, so nothing else in this session runs interpreted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("triton_kernel_cases.py")


def test_triton_kernels_match_their_reference_ops_and_the_family_math_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout[-12000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"interpreted kernel cases failed:\n{report}"
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], report
