"""Packing variable-length sequences into micro-batches without padding between them.

Each micro-batch is ONE row of concatenated sequences. Position ids restart at 0 for every sequence and
attention stays inside each sequence, so the packed row computes exactly what each sequence alone would. A
row carries only its boundaries (``cu_seqlens``): Transformer Engine's THD attention takes them as they
are; megatron's local attention needs the explicit block-diagonal causal mask, which
:func:`block_causal_mask` builds from them when that path runs. The mask is O(S^2) booleans (268 MB at
16,384 tokens), so it is never kept with the micro-batches of a step.
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

    Returns ``tokens`` (1, S), ``position_ids`` (1, S) and ``cu_seqlens`` (n + 1,) int32 boundaries
    (THD attention's input; :func:`block_causal_mask` for the local path).
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    total = int(lengths.sum())
    tokens = torch.cat(sequences).long().view(1, total)
    seq_id = torch.repeat_interleave(torch.arange(len(sequences)), lengths)  # (S,)
    starts = torch.cumsum(lengths, 0) - lengths
    position_ids = (torch.arange(total) - starts[seq_id]).view(1, total)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).int()])
    # The longest sequence as a Python int, known here on the host: THD attention needs it, and reading it
    # from the device copy of cu_seqlens would sync the device once per micro-batch.
    return {"tokens": tokens, "position_ids": position_ids, "cu_seqlens": cu_seqlens,
            "max_seqlen": int(lengths.max()) if len(sequences) else 0}


ROW_KEYS = ("tokens", "position_ids", "cu_seqlens", "max_seqlen")
"""What :func:`pack_row` returns; any other tensor of a micro-batch is per token (S,)."""


def pad_row(mb: dict, multiple: int, fill: dict[str, int]) -> dict:
    """``mb`` (a :func:`pack_row` row plus per-token tensors (S,)) padded to a multiple of ``multiple`` tokens.

    Sequence parallelism scatters the row over the TP ranks and requires S % TP == 0 (megatron-core
    tensor_parallel/mappings.py ``_split_along_first_dim``). The padding is a pseudo-sequence of its own: token
    0 at positions 0.., closed by its own ``cu_seqlens`` entry, so attention never mixes it with a real
    sequence and its activations stay finite (a NaN there would survive the zero weight in the backward);
    per-token tensors get ``fill[key]`` (labels: the ignore label) or 0, so it carries no loss and no metric.
    """
    total = mb["tokens"].shape[1]
    pad = -total % multiple
    if pad == 0:
        return mb
    out = dict(mb)
    out["tokens"] = torch.cat([mb["tokens"], mb["tokens"].new_zeros(1, pad)], dim=1)
    out["position_ids"] = torch.cat([mb["position_ids"], torch.arange(pad).view(1, pad)], dim=1)
    out["cu_seqlens"] = torch.cat([mb["cu_seqlens"], mb["cu_seqlens"].new_tensor([total + pad])])
    out["max_seqlen"] = max(mb["max_seqlen"], pad)
    for key, value in mb.items():
        if key not in ROW_KEYS and isinstance(value, torch.Tensor):
            out[key] = torch.cat([value, value.new_full((pad,), fill.get(key, 0))])
    return out


def block_causal_mask(cu_seqlens: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, S, S) bool, True = masked (megatron's convention): causal inside each packed sequence, nothing
    across them. Built on ``device`` directly (no host copy to move)."""
    total = int(cu_seqlens[-1])  # read on the host copy: no device sync
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq_id = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), cu[1:] - cu[:-1],
                                     output_size=total)  # (S,); output_size: no device sync
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return (~(causal & (seq_id[:, None] == seq_id[None, :]))).view(1, 1, total, total)
