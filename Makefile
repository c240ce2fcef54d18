# The two commands of the README: `make test` (all set-up + the test suite) and, later, `make demo`.
VENV ?= .venv

.PHONY: setup test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

test: setup
	bash scripts/run_tests.sh $(VENV)

clean:
	rm -rf $(VENV) .pytest_cache
