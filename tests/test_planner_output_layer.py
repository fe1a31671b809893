"""The planner's output-layer term (plan/memory.py output_layer_bytes) against the measured peak memory of
the real fused output layer + TRAPO loss, forward and backward, on the CPU (the device kind's chunk sizes):
one real anchor per mode and dtype, within 15%. Measured in a fresh interpreter with glibc's mmap threshold
pinned, as benchmarks/fused_output.py measures (freed buffers go back to the system)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trapo_megatron.plan.memory import output_layer_bytes

TOKENS, HIDDEN, VOCAB = 2048, 256, 16384
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
MEASURE = f"""
import functools, sys, torch
sys.path.insert(0, {str(BENCH)!r})
from fused_output import clear_grads, fused, make_inputs, recompute, runner
from loss_kernel import CFG, DTYPES, peak_extra_bytes
torch.set_num_threads(1)
mode, dtype, main_grad = sys.argv[1], DTYPES[sys.argv[2]], sys.argv[3] == "1"
h, w, batch = make_inputs({TOKENS}, {HIDDEN}, {VOCAB}, dtype, main_grad=main_grad)
assert CFG.chunk_tokens is None  # the default chunk sizes, which the planner models
print(peak_extra_bytes(runner({{"forward": fused, "recompute": recompute}}[mode], h, w, batch),
                       functools.partial(clear_grads, h, w), "cpu"))
"""


@pytest.mark.parametrize("mode,dtype,main_grad", [("forward", "fp32", True), ("forward", "bf16", True),
                                                  ("forward", "bf16", False), ("recompute", "fp32", True)])
def test_output_layer_term_matches_measured_peak(mode: str, dtype: str, main_grad: bool) -> None:
    """With the trainer's fp32 main_grad (the weight gradient summed into it, or a .grad added by DDP's hook),
    and without one (forward's own fp32 sum)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, dtype, str(int(main_grad))], check=True,
                         capture_output=True, text=True, env=env).stdout
    measured = float(out.strip().splitlines()[-1])
    planned = output_layer_bytes(mode, TOKENS, VOCAB, HIDDEN, 4 if dtype == "fp32" else 2, kind="cpu",
                                 main_grad=main_grad)
    assert planned == pytest.approx(measured, rel=0.15), (mode, dtype, main_grad, planned / 2**20, measured / 2**20)
    # the fused paths never plan the unfused logits: the whole point of them
    assert planned < output_layer_bytes("unfused", TOKENS, VOCAB, HIDDEN, 4) / 2
