#!/usr/bin/env bash
# Runs the test suite in the virtualenv. pytest exits 5 when it collects nothing: that is a failure here too,
# because a suite that silently collects nothing checks nothing.
set -uo pipefail
venv="${1:-.venv}"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1
"$venv/bin/python" -m pytest "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
