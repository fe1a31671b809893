#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from the lock file.
# Idempotent: does nothing when the venv already matches requirements/lock.txt and pyproject.toml.
# Usage: tools/bootstrap.sh [VENV_DIR]
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
stamp="$venv/.trapo-stamp"
want=$(cat requirements/lock.txt pyproject.toml tools/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

# A Python 3.12 interpreter: python3.12 on PATH if it runs, else a pyenv-installed 3.12.
find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1; then
    command -v python3.12; return
  fi
  for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  echo "error: Python 3.12 not found (set PYTHON=/path/to/python3.12)" >&2
  exit 1
}
python=$(find_python)

# uv: from PATH, else a small tool venv in the user cache (pinned version).
uv_bin=$(command -v uv || true)
if [ -z "$uv_bin" ]; then
  tools_dir="${XDG_CACHE_HOME:-$HOME/.cache}/trapo-megatron/uv-0.13.9"
  if [ ! -x "$tools_dir/bin/uv" ]; then
    echo "bootstrap: installing uv into $tools_dir"
    "$python" -m venv "$tools_dir"
    "$tools_dir/bin/pip" install -q "uv==0.13.9"
  fi
  uv_bin="$tools_dir/bin/uv"
fi

export UV_PYTHON_DOWNLOADS=never
echo "bootstrap: creating $venv with $python"
"$uv_bin" venv -q --allow-existing --python "$python" "$venv"
# --compile-bytecode: every process (each rank of each test run) would otherwise compile the ~4,000 modules it
# imports from source when PYTHONDONTWRITEBYTECODE is set or site-packages is read-only (~12 s per process,
# measured); compiling once here takes ~30 s on 2 cores.
VIRTUAL_ENV="$here/$venv" "$uv_bin" pip sync -q --compile-bytecode requirements/lock.txt
VIRTUAL_ENV="$here/$venv" "$uv_bin" pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "bootstrap: $venv ready"
