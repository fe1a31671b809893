"""algo/ and the vocab-parallel kernels stay plain torch: importing them loads no heavy stack."""

import subprocess
import sys

MODULES = [
    "trapo_megatron.algo.advantages",
    "trapo_megatron.algo.aggregation",
    "trapo_megatron.algo.loss",
    "trapo_megatron.algo.masks",
    "trapo_megatron.algo.objectives",
    "trapo_megatron.algo.policy_gradient",
    "trapo_megatron.megatron.vocab_parallel",
]
FORBIDDEN = ("megatron.core", "vllm", "nemo_run", "transformers", "transformer_engine")


def test_no_heavy_imports():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith({FORBIDDEN!r}))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"forbidden imports: {out.stdout.strip()}"
