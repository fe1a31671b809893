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

MIN_CHUNK_ELEMENTS = 1 << 20
"""...but a chunk of at least this many elements where the tokens have them: below it a chunk's fixed costs
(per-op overhead; with gradients in forward, its two all-reduces and the loss's autograd) outweigh the
memory it saves. A small vocabulary (the demo's) then takes all its tokens in one chunk: 32 chunks of it
made the demo's steps ~1.5x longer."""

FORWARD_CHUNK_TOKENS = 1024
"""Rows per output-layer GEMM of the fused output layer with gradients in forward (at most 1/8 of the tokens,
FORWARD_CHUNK_FRACTION): each GEMM chunk adds its [V/P, h] weight-gradient product into the fp32 sum, which
a chunk of C tokens amortises over C/4 GEMM FLOPs per byte. An H100 does ~300 bf16 FLOPs per byte of HBM:
1024 tokens. Measured on 2 CPU threads at Qwen2.5-7B TP2 shapes in bf16: 256-token chunks made the fused
output layer 1.43x the unfused time (the fp32 sum read and written 32 times), 1024-token ones 1.04x (README).
Only the GEMM chunk is this large: the softmax work runs over sub-chunks (forward_sub_chunk_tokens)."""

FORWARD_CHUNK_FRACTION = 8
"""At most 1/8 of the tokens per GEMM chunk: its [C, V/P] buffer in the model dtype is at most 1/8 of the
logits the unfused path writes."""

WEIGHT_GRAD_BLOCK_ELEMENTS = 1 << 21
"""A low-precision weight gradient is summed in fp32 over the token chunks, vocabulary block by block: each
block's product goes through a work buffer of this many elements in the model dtype (4 MiB in bf16) and its
fp32 copy, small enough to stay in cache between the GEMM that writes them and the add that reads them.
Measured on 2 CPU threads (256 tokens, h 3584, V/2 rows): 512-row blocks made GEMM + sum 0.18 s, 1/8 of the
weight 0.44 s."""


def weight_grad_block_rows(vocab_local: int, hidden: int) -> int:
    """Vocabulary rows per block of the fp32 weight-gradient sum (:data:`WEIGHT_GRAD_BLOCK_ELEMENTS`)."""
    return max(1, min(vocab_local, WEIGHT_GRAD_BLOCK_ELEMENTS // max(hidden, 1)))


def device_kind(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "other"


def _share(num_tokens: int, vocab_local: int, fraction: int) -> int:
    """1/``fraction`` of the tokens (rounded up), but at least MIN_CHUNK_ELEMENTS' worth."""
    return max(-(-num_tokens // fraction), MIN_CHUNK_ELEMENTS // max(vocab_local, 1))


def kernel_chunk_tokens(num_tokens: int, vocab_local: int, kind: str) -> int:
    """Tokens per chunk of the log-prob / entropy kernels (and the recomputing fused output layer)."""
    share = _share(num_tokens, vocab_local, MAX_CHUNK_FRACTION)
    return max(1, min(CHUNK_ELEMENTS[kind] // max(vocab_local, 1), share))


def forward_chunk_tokens(num_tokens: int, vocab_local: int, kind: str) -> int:
    """Rows per output-layer GEMM chunk of the fused output layer with gradients in forward."""
    widest = max(FORWARD_CHUNK_TOKENS, CHUNK_ELEMENTS[kind] // max(vocab_local, 1))
    return max(1, min(widest, _share(num_tokens, vocab_local, FORWARD_CHUNK_FRACTION)))


def forward_sub_chunk_tokens(rows: int, num_tokens: int, vocab_local: int, kind: str) -> int:
    """Tokens per softmax sub-chunk (its fp32 work buffers) within GEMM chunks of ``rows`` tokens."""
    return min(rows, kernel_chunk_tokens(num_tokens, vocab_local, kind))


def grads_mode(setting: str, dtype: object, main_grad: bool) -> str:
    """``loss.fused_output_grads`` resolved for an output weight of ``dtype`` (a torch dtype or its name),
    ``main_grad``: whether it has Megatron DDP's fp32 gradient buffer (the trainer's always has). "auto" is
    "forward" wherever the weight gradient's fp32 sum has a home: the weight itself in fp32 / fp64, or
    main_grad; "recompute" for a 16-bit weight without one, where forward would add a weight-sized fp32 sum.
    Measured on the CPU at Qwen2.5-7B TP2 shapes in bf16, with main_grad: forward 0.195x the logits' memory,
    1.09x the unfused time; recompute 0.69x, 1.9x."""
    if setting != "auto":
        return setting
    fp32_weight = str(dtype).removeprefix("torch.") in ("float32", "float64")
    return "forward" if main_grad or fp32_weight else "recompute"
