"""data/, reward/, the schedule and the rollout modules import without megatron, vllm or nemo_run."""

import subprocess
import sys

MODULES = [
    "trapo_megatron.data", "trapo_megatron.reward", "trapo_megatron.algo.micro_groups",
    "trapo_megatron.rollout", "trapo_megatron.rollout.waves", "trapo_megatron.rollout.cpu_engine",
    "trapo_megatron.rollout.vllm_engine",
]


def test_no_gpu_stack_imports():
    code = (
        f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'vllm', 'nemo_run'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
