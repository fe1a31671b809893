# `make demo` and `make test` work from a clean clone: both create .venv from the lock file first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test demo lock lint clean

venv:
	@bash tools/bootstrap.sh $(VENV)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/trapo demo

lint: venv
	$(VENV)/bin/ruff check trapo_megatron tests benchmarks tools

# Re-resolve the lock file after editing pyproject.toml dependencies.
UV ?= $(shell command -v uv || echo $${XDG_CACHE_HOME:-$$HOME/.cache}/trapo-megatron/uv-0.13.9/bin/uv)
lock: venv
	$(UV) pip compile pyproject.toml --python-version 3.12 --extra dev --extra launch -o requirements/lock.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
