"""How the output-layer kernels work through the tokens (how many at a time, and when the fused output layer
computes its gradients): one place for the trainer's kernels (vocab_parallel.py, fused_output.py) and the
planner that sizes their work buffers (plan/memory.py).
No torch import: the planner reads this on machines without one."""

from __future__ import annotations

CHUNK_ELEMENTS = {"cpu": 1 << 23, "other": 1 << 24}
"""fp32 elements of one [chunk, V/P] work buffer of the kernels (two exist at a time). Measured on 2 CPU
threads: ~55 tokens of a 151,936 vocabulary per chunk cost 2-3x less CPU than the full log_softmax, while
chunks of a few tokens lose it to per-op thread synchronization; on an accelerator large chunks keep
launches few."""

MAX_CHUNK_FRACTION = 32
"""At most 1/32 of the tokens per chunk, so the two buffers add at most 1/16 of the logits' element count."""

MIN_FORWARD_CHUNK_TOKENS = {"cpu": 256, "other": 1024}
"""Tokens per chunk at least, for the fused output layer's gradients in forward: each chunk reads and writes
the whole [V/P, h] weight gradient, which a chunk of C tokens amortises over C/4 GEMM FLOPs per byte.
Measured on 2 CPU threads (T 1024, h 512, V 151,936): 32-token chunks took 2.0x the unfused time,
256-token ones 0.97x (fp32) and 0.57x (bf16). An H100 does ~300 bf16 FLOPs per byte of HBM: 1024 tokens."""

WEIGHT_GRAD_BLOCKS = 8
"""A low-precision weight gradient is summed in fp32 over the token chunks, vocabulary block by block, through
a work buffer of 1/WEIGHT_GRAD_BLOCKS of the weight in the model dtype."""


def device_kind(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "other"


def kernel_chunk_tokens(num_tokens: int, vocab_local: int, kind: str) -> int:
    """Tokens per chunk of the log-prob / entropy kernels (and the recomputing fused output layer)."""
    return max(1, min(CHUNK_ELEMENTS[kind] // max(vocab_local, 1), -(-num_tokens // MAX_CHUNK_FRACTION)))


def forward_chunk_tokens(vocab_local: int, kind: str) -> int:
    """Tokens per chunk of the fused output layer with gradients in forward."""
    return max(MIN_FORWARD_CHUNK_TOKENS[kind], CHUNK_ELEMENTS[kind] // max(vocab_local, 1))


def grads_mode(setting: str, dtype: object) -> str:
    """``loss.fused_output_grads`` resolved for an output weight of ``dtype`` (a torch dtype or its name):
    "auto" is "forward" in fp32 / fp64, where the GEMM itself accumulates the weight gradient over the chunks,
    and "recompute" in 16 bits, where the fp32 sum costs a weight-sized read-modify-write per chunk (measured
    on the CPU at Qwen2.5-7B shapes, bf16: forward 1.99x the unfused time, recompute 1.53x)."""
    if setting != "auto":
        return setting
    return "forward" if str(dtype).removeprefix("torch.") in ("float32", "float64") else "recompute"
