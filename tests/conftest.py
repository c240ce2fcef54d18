"""Shared fixtures: the tiny test models (built once, cached on disk) and their specs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tenfold.tiny_llama import TinyLlamaConfig, build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
CACHE = Path(os.environ.get("TENFOLD_TEST_CACHE", REPO / ".tenfold-cache"))

TINY_MODELS = {
    "mha": TinyLlamaConfig(num_heads=4, num_kv_heads=4),  # multi-head: num_kv_heads == num_heads
    "gqa": TinyLlamaConfig(num_heads=4, num_kv_heads=2, seed=1),  # grouped-query: 2 query heads per kv head
}


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, Path]:
    return {name: build_tiny_llama(CACHE / f"tiny-llama-{name}", CORPUS, cfg) for name, cfg in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def hf_models(tiny_model_dirs):
    """The tiny models loaded once in fp32, eval mode; tests must leave them unchanged (attach then detach)."""
    import torch
    from transformers import AutoModelForCausalLM

    models = {}
    for name, path in tiny_model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        models[name] = model
    return models


@pytest.fixture(scope="session")
def specs(hf_models):
    from tenfold.adapters import ModelSpec

    return {name: ModelSpec.from_hf_config(model.config) for name, model in hf_models.items()}


@pytest.fixture(params=sorted(TINY_MODELS))
def model_name(request) -> str:
    return request.param


# --- CI: no quiet skips -------------------------------------------------------------------------------------------
# Most engine tests start with importorskip("vllm") / importorskip("triton"): on a developer machine without the cpu
# extra they skip, but in CI a broken vLLM or Triton import would turn the whole engine suite into skips and a green
# run. With CI=true (or TENFOLD_STRICT_TESTS=1) the session fails when either cannot be imported, and when any test
# is skipped for a reason not listed here.
STRICT = os.environ.get("CI", "").lower() in ("true", "1", "yes") or os.environ.get("TENFOLD_STRICT_TESTS") == "1"
REQUIRED_IMPORTS = tuple(os.environ.get("TENFOLD_CI_REQUIRED_IMPORTS", "vllm,triton,ray").split(","))  # env: for its test
ACCEPTED_SKIP_REASONS = ("needs CUDA", "needs a GPU")  # hardware CI machines do not have
_unaccepted_skips: list[tuple[str, str]] = []


def pytest_sessionstart(session):
    if not STRICT:
        return
    for name in REQUIRED_IMPORTS:  # in a child process: importing vllm here would change this process
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise pytest.UsageError(f"CI: {name} cannot be imported ({tail}); the tests that need it would all be "
                                    f"skipped, so the run fails instead")


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _note_skip(report) -> None:
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(accepted in reason for accepted in ACCEPTED_SKIP_REASONS):
            _unaccepted_skips.append((report.nodeid, reason))


def pytest_collectreport(report):
    _note_skip(report)  # module-level importorskip


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _unaccepted_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unaccepted_skips:
        terminalreporter.section("CI: skips without an accepted reason (failing the run)", red=True)
        for nodeid, reason in _unaccepted_skips:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(f"accepted reasons: {', '.join(ACCEPTED_SKIP_REASONS)}")
