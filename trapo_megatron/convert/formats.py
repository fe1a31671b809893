"""Format: how several Hugging Face tensors become one Megatron tensor and back, at TP=1 (pure functions).

Megatron fuses Q, K and V into ``linear_qkv`` grouped per query group (GQA): for each of the
``num_query_groups`` groups g the rows are [q heads of group g..., k_g, v_g], each head ``head_dim`` rows.
Because groups are contiguous, a TP split of the fused tensor along dim 0 hands each rank whole groups,
so the TP=1 layout defined here is also the global layout of a distributed checkpoint.

SwiGLU's ``linear_fc1`` is [gate; up] at TP=1. Per TP rank it is [gate shard; up shard]; that interleave is
distribution's business (``distribution.Shard.GATED_COLUMN``), not format's.

Every merge has a split that inverts it exactly (tests check the round trip on random tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch


class Format(StrEnum):
    """How the Hugging Face tensors of one mapping entry combine into its Megatron tensor."""

    IDENTITY = "identity"  # one HF tensor, same layout
    QKV = "qkv"  # q, k, v -> grouped linear_qkv (weight or bias)
    GATE_UP = "gate_up"  # gate, up -> [gate; up]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """q (nq*d, ...), k (ng*d, ...), v (ng*d, ...) -> (ng*(nq/ng + 2)*d, ...) grouped [q_g..., k_g, v_g].

    Works for weights (trailing dim = hidden) and biases (1-D) alike.
    """
    rest = q.shape[1:]
    if k.shape != v.shape or k.shape[1:] != rest:
        raise ValueError(f"q/k/v shapes do not fit together: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] % num_query_groups or q.shape[0] % k.shape[0]:
        raise ValueError(
            f"k rows {k.shape[0]} are not a multiple of num_query_groups={num_query_groups} "
            f"or do not divide q rows {q.shape[0]}"
        )
    head_dim = k.shape[0] // num_query_groups
    q_rows = q.shape[0] // num_query_groups  # rows of q per group: heads_per_group * head_dim
    fused = torch.cat(
        [
            q.reshape(num_query_groups, q_rows, *rest),
            k.reshape(num_query_groups, head_dim, *rest),
            v.reshape(num_query_groups, head_dim, *rest),
        ],
        dim=1,
    )  # (ng, q_rows + 2d, ...)
    return fused.reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv`: grouped linear_qkv -> contiguous q, k, v."""
    rest = qkv.shape[1:]
    heads_per_group = num_attention_heads // num_query_groups
    rows_per_group = qkv.shape[0] // num_query_groups
    if qkv.shape[0] % (num_query_groups * (heads_per_group + 2)):
        raise ValueError(
            f"linear_qkv rows {qkv.shape[0]} do not fit {num_attention_heads} heads in {num_query_groups} groups"
        )
    head_dim = rows_per_group // (heads_per_group + 2)
    grouped = qkv.reshape(num_query_groups, rows_per_group, *rest)
    q_rows = heads_per_group * head_dim
    q = grouped[:, :q_rows].reshape(-1, *rest)
    k = grouped[:, q_rows : q_rows + head_dim].reshape(-1, *rest)
    v = grouped[:, q_rows + head_dim :].reshape(-1, *rest)
    return q, k, v


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate (I, H), up (I, H) -> linear_fc1 (2I, H) = [gate; up]."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_gate_up` (views, no copy)."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 rows {fc1.shape[0]} must be even ([gate; up])")
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


# Format -> (merge(hf tensors, dims) -> mcore tensor, split(mcore tensor, dims) -> hf tensors).
# ``heads`` is (num_attention_heads, num_query_groups).
Merge = Callable[[list[torch.Tensor], tuple[int, int]], torch.Tensor]
Split = Callable[[torch.Tensor, tuple[int, int]], tuple[torch.Tensor, ...]]
FORMATS: dict[Format, tuple[Merge, Split]] = {
    Format.IDENTITY: (lambda ts, heads: ts[0], lambda t, heads: (t,)),
    Format.QKV: (lambda ts, heads: merge_qkv(*ts, heads[1]), lambda t, heads: split_qkv(t, *heads)),
    Format.GATE_UP: (lambda ts, heads: merge_gate_up(*ts), lambda t, heads: split_gate_up(t)),
}


def merge(fmt: Format, hf_tensors: list[torch.Tensor], heads: tuple[int, int]) -> torch.Tensor:
    """HF tensors of one entry -> its Megatron tensor at TP=1."""
    return FORMATS[fmt][0](hf_tensors, heads)


def split(fmt: Format, mcore: torch.Tensor, heads: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Megatron tensor at TP=1 -> the entry's HF tensors, in the entry's order."""
    return FORMATS[fmt][1](mcore, heads)
