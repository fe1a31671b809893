#!/usr/bin/env bash
# Create (or refresh) the real-vLLM test environment from the GPU lock: vllm 0.33.0, megatron-core, torch and
# everything else the image gets, minus Transformer Engine (its torch extension is an sdist that compiles
# against CUDA; the image builds it, a CPU machine cannot). Kept apart from .venv: vLLM moves numpy,
# setuptools, fastapi... off the CPU lock's pins.
# Idempotent: does nothing when the venv already matches requirements/gpu-lock.txt and pyproject.toml.
# Usage: tools/vllm_venv.sh [VENV_DIR]    (default .venv-vllm)
set -euo pipefail
venv=${1:-.venv-vllm}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
stamp="$venv/.trapo-stamp"
want=$(cat requirements/gpu-lock.txt pyproject.toml tools/vllm_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
# The CPU venv's bootstrap finds Python 3.12 and uv; reuse what it found.
bash tools/bootstrap.sh .venv
uv_bin=$(command -v uv || echo "${XDG_CACHE_HOME:-$HOME/.cache}/trapo-megatron/uv-0.13.9/bin/uv")
python=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')

export UV_PYTHON_DOWNLOADS=never
start=$(date +%s)
echo "vllm_venv: creating $venv with $python"
"$uv_bin" venv -q --allow-existing --python "$python" "$venv"
lock=$(mktemp)
trap 'rm -f "$lock"' EXIT
grep -v '^transformer-engine' requirements/gpu-lock.txt > "$lock"
VIRTUAL_ENV="$here/$venv" "$uv_bin" pip sync -q --compile-bytecode "$lock"  # why: tools/bootstrap.sh
VIRTUAL_ENV="$here/$venv" "$uv_bin" pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "vllm_venv: $venv ready in $(( $(date +%s) - start )) s"
