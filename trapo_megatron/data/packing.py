"""Packing variable-length sequences into micro-batches without padding between them.

Each micro-batch is ONE row of concatenated sequences. Position ids restart at 0 for every sequence and the
attention mask is block-diagonal causal, so the packed row computes exactly what each sequence alone would
(megatron's local attention honours the explicit mask; on GPU the same boundaries become THD cu_seqlens).
The mask is O(S^2) booleans: fine for the CPU path; the GPU path uses the boundaries only.
"""

from __future__ import annotations

import torch


def plan_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most ``max_tokens`` tokens (first-fit decreasing,
    deterministic). A sequence longer than ``max_tokens`` gets a micro-batch of its own."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def pack_row(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate 1-D token tensors into one row.

    Returns ``tokens`` (1, S), ``position_ids`` (1, S), ``attention_mask`` (1, 1, S, S) bool with True =
    masked (megatron's convention), ``cu_seqlens`` (n + 1,) int32 boundaries for THD attention on GPU.
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    total = int(lengths.sum())
    tokens = torch.cat(sequences).long().view(1, total)
    seq_id = torch.repeat_interleave(torch.arange(len(sequences)), lengths)  # (S,)
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = (torch.arange(total) - starts[seq_id]).view(1, total)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same_seq = seq_id[:, None] == seq_id[None, :]
    attention_mask = ~(causal & same_seq)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).int()])
    return {
        "tokens": tokens,
        "position_ids": position_ids,
        "attention_mask": attention_mask.view(1, 1, total, total),
        "cu_seqlens": cu_seqlens,
    }
