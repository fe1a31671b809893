#!/usr/bin/env bash
# The first hour on a GPU machine, in <= 10 minutes, with nothing but a preinstalled torch and what we carry
# (this repository plus a folder of small wheels: no network, no vLLM, no Transformer Engine).
#
#   bash tools/gpu_day.sh OUT_DIR [WHEELS_DIR]
#
# 1. finds a Python whose torch sees a GPU ($PYTHON, python3, python) and says exactly what is missing;
# 2. installs the Python packages it lacks from WHEELS_DIR only (pip --no-index) into a venv that sees the
#    system's torch (--system-site-packages); `bash tools/gpu_day.sh --wheels-list` prints what to carry;
# 3. tools/gpu_check.py --device cuda (NCCL, logits vs transformers, a bf16 train step with peak memory
#    against the planner, the weight stream, the vocab kernels, a checkpoint round trip);
# 4. `trapo train` at world 1 on NCCL (local spec, CPU twin engine, offload grads+optimizer) for 2 steps,
#    then a resume to step 3, under torch.cuda.set_sync_debug_mode("warn"): device->host syncs are counted.
# One JSON line per result in OUT_DIR/gpu_day.jsonl; exit status 1 when any failed.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# The modules `trapo train` and gpu_check.py import beyond torch (pyproject.toml), with the lock's versions.
modules=(megatron.core transformers tokenizers safetensors math_verify yaml psutil tqdm)
wheels=(megatron-core transformers tokenizers safetensors huggingface-hub math-verify latex2sympy2-extended
        antlr4-python3-runtime pyyaml psutil tqdm regex)
if [ "${1:-}" = "--wheels-list" ]; then
  for w in "${wheels[@]}"; do grep -i "^${w}==" "$here/requirements/lock.txt" || echo "$w"; done
  exit 0
fi
out=${1:?usage: tools/gpu_day.sh OUT_DIR [WHEELS_DIR] | --wheels-list}
wheel_dir=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu_day.jsonl"
: > "$log"
failed=0
result() {  # name ok(true|false) extra-json
  echo "{\"name\": \"$1\", \"ok\": $2${3:+, $3}}" | tee -a "$log"
  [ "$2" = true ] || failed=1
}

python=""
for p in ${PYTHON:-} python3 python; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    python=$(command -v "$p"); break
  fi
done
if [ -z "$python" ]; then
  result python false "\"error\": \"no Python with a CUDA torch: tried ${PYTHON:-} python3 python (set PYTHON=/path/to/python)\""
  exit 1
fi
result python true "\"python\": \"$python\", \"torch\": \"$("$python" -c 'import torch; print(torch.__version__)')\""

missing=()
for m in "${modules[@]}"; do "$python" -c "import $m" 2>/dev/null || missing+=("$m"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ -z "$wheel_dir" ]; then
    result packages false "\"missing\": \"${missing[*]}\", \"error\": \"pass a WHEELS_DIR with them (tools/gpu_day.sh --wheels-list)\""
    exit 1
  fi
  "$python" -m venv --system-site-packages "$out/venv" || { result packages false "\"error\": \"python -m venv failed\""; exit 1; }
  python="$out/venv/bin/python"
  if ! "$python" -m pip install -q --no-index --find-links "$wheel_dir" --no-deps "$wheel_dir"/*.whl >"$out/pip.log" 2>&1; then
    result packages false "\"missing\": \"${missing[*]}\", \"error\": \"pip from $wheel_dir failed: $(tail -1 "$out/pip.log" | tr '"' "'")\""
    exit 1
  fi
  still=()
  for m in "${modules[@]}"; do "$python" -c "import $m" 2>/dev/null || still+=("$m"); done
  if [ "${#still[@]}" -gt 0 ]; then
    result packages false "\"missing\": \"${still[*]}\", \"error\": \"not in $wheel_dir\""; exit 1
  fi
fi
result packages true "\"installed_from_wheels\": \"${missing[*]}\""
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

start=$(date +%s)
timeout 420 "$python" "$here/tools/gpu_check.py" --device cuda --out "$out/gpu_check" >"$out/gpu_check.log" 2>&1
rc=$?
result gpu_check "$([ $rc = 0 ] && echo true || echo false)" "\"exit\": $rc, \"seconds\": $(( $(date +%s) - start )), \"lines\": \"gpu_check/gpu_check.jsonl\""

run_dir="$out/train"
train() {  # max_steps, extra args
  TRAPO_CUDA_SYNC_DEBUG=warn timeout 240 "$python" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m trapo_megatron.commands train --config "$here/examples/tiny_cpu.yaml" "${@:2}" \
    run.output_dir="$run_dir" run.max_steps="$1" checkpoint.save_every=1 checkpoint.export_hf=false \
    parallel.tensor_model_parallel_size=1 model.transformer_impl=local engine.kind=cpu \
    engine.offload_during_rollout=grads+optimizer evaluation.every=0 \
    model.hf_path="$here/trapo_megatron/assets/demo/model" data.path="$here/trapo_megatron/assets/demo/train.jsonl" \
    evaluation.path="$here/trapo_megatron/assets/demo/heldout.jsonl"
}
start=$(date +%s)
train 2 >"$out/train.log" 2>&1; rc1=$?
train 3 --resume >"$out/resume.log" 2>&1; rc2=$?
steps=$(grep -c '"step"' "$run_dir/metrics.jsonl" 2>/dev/null || echo 0)
syncs=$(cat "$out/train.log" "$out/resume.log" | grep -c "synchronizing operation" || true)
ok=$([ $rc1 = 0 ] && [ $rc2 = 0 ] && [ "$steps" = 3 ] && echo true || echo false)
result train_resume "$ok" "\"exit\": [$rc1, $rc2], \"steps\": $steps, \"sync_warnings\": $syncs, \"seconds\": $(( $(date +%s) - start ))"
exit $failed
