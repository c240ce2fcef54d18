#!/usr/bin/env bash
# Runs the test suite in the virtualenv. pytest exits 5 when it collects nothing: that is a failure here too,
# because a suite that silently collects nothing checks nothing.
set -uo pipefail
venv="${1:-.venv}"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1
# In CI (CI=true) a vLLM or Triton that cannot be imported fails the run here, with its error, instead of turning
# the engine and kernel tests into skips; tests/conftest.py also fails any skip without an accepted reason.
if [ "${CI:-}" = "true" ] || [ "${TENFOLD_STRICT_TESTS:-}" = "1" ]; then
  for module in vllm triton; do
    if ! err=$("$venv/bin/python" -c "import $module" 2>&1 >/dev/null); then
      echo "CI: $module cannot be imported, failing on purpose (its tests would all be skipped):" >&2
      echo "$err" | tail -n 3 >&2
      exit 1
    fi
  done
fi
"$venv/bin/python" -m pytest "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
