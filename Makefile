# The README's two commands: `make demo` (set-up + the demo: SmolLM2-135M-Instruct with three trained adapters) and `make test`
# (set-up + the test suite).
VENV ?= .venv
CPU_ENV = VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) cpu,test,bench,model,ray
	touch $@

test: setup
	bash scripts/run_tests.sh $(VENV)

demo: setup
	$(CPU_ENV) $(VENV)/bin/tenfold demo

clean:
	rm -rf $(VENV) .pytest_cache .tenfold-cache .tenfold-demo
