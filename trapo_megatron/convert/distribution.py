"""Distribution: how a Megatron tensor at TP=1 is split over tensor-parallel ranks and gathered back.

Pure functions over tensors; the only collective helpers take their process group as an argument (never read
from global parallel state). Pipeline placement is not recomputed here: a built model knows it
(``TransformerLayer.layer_number`` is the global, 1-based layer index), and a distributed checkpoint stores
layers stacked on a leading global-layer axis, so neither needs a placement rule of ours.

Kinds of split (``Shard``):
- REPLICATED: every rank holds the whole tensor (norms).
- COLUMN: dim 0 in contiguous chunks (linear_qkv weight/bias: whole query groups per rank).
- ROW: dim 1 in contiguous chunks (linear_proj, linear_fc2: row-parallel inputs).
- GATED_COLUMN: the two halves [gate; up] each chunked on dim 0; rank r holds [gate_r; up_r].
- VOCAB: dim 0 in contiguous chunks after zero-padding the rows to the model's padded vocabulary
  (embedding, output layer); gathering trims the padding again.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class Shard(StrEnum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    GATED_COLUMN = "gated_column"
    VOCAB = "vocab"


def _chunk(t: torch.Tensor, dim: int, tp_size: int, what: str) -> tuple[torch.Tensor, ...]:
    if t.shape[dim] % tp_size:
        raise ValueError(f"{what}: dim {dim} of size {t.shape[dim]} is not divisible by TP={tp_size}")
    return t.chunk(tp_size, dim=dim)


def local_shape(full_shape: tuple[int, ...], shard: Shard, tp_size: int, padded_rows: int | None = None) -> tuple:
    """Shape of one rank's shard of a tensor whose TP=1 shape is ``full_shape``."""
    shape = list(full_shape)
    if shard is Shard.VOCAB:
        shape[0] = (padded_rows or shape[0]) // tp_size
    elif shard in (Shard.COLUMN, Shard.GATED_COLUMN):
        shape[0] //= tp_size
    elif shard is Shard.ROW:
        shape[1] //= tp_size
    return tuple(shape)


def shard_for_rank(
    full: torch.Tensor, shard: Shard, tp_rank: int, tp_size: int, *, padded_rows: int | None = None, what: str = ""
) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of the TP=1 tensor ``full`` (a view where the layout allows)."""
    if shard is Shard.REPLICATED or tp_size == 1 and shard is not Shard.VOCAB:
        return full
    if shard is Shard.COLUMN:
        return _chunk(full, 0, tp_size, what)[tp_rank]
    if shard is Shard.ROW:
        return _chunk(full, 1, tp_size, what)[tp_rank]
    if shard is Shard.GATED_COLUMN:
        gate, up = _chunk(full, 0, 2, what)
        return torch.cat([_chunk(gate, 0, tp_size, what)[tp_rank], _chunk(up, 0, tp_size, what)[tp_rank]])
    if shard is Shard.VOCAB:
        rows = padded_rows or full.shape[0]
        if rows < full.shape[0] or rows % tp_size:
            raise ValueError(
                f"{what}: padded vocabulary {rows} must be >= the real {full.shape[0]} and divisible by TP={tp_size}"
            )
        per_rank = rows // tp_size
        real = full[tp_rank * per_rank : min((tp_rank + 1) * per_rank, full.shape[0])]  # may be empty
        if real.shape[0] == per_rank:
            return real
        return torch.cat([real, full.new_zeros((per_rank - real.shape[0], *full.shape[1:]))])
    raise AssertionError(shard)


def split_for_tp(full: torch.Tensor, shard: Shard, tp_size: int, *, padded_rows: int | None = None) -> list:
    """All ranks' shards, in rank order."""
    return [shard_for_rank(full, shard, r, tp_size, padded_rows=padded_rows) for r in range(tp_size)]


def merge_tp(shards: list[torch.Tensor], shard: Shard, *, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`split_for_tp`; for VOCAB, ``rows`` is the true (unpadded) vocabulary size."""
    if shard is Shard.REPLICATED or len(shards) == 1 and shard is not Shard.VOCAB:
        return shards[0]
    if shard is Shard.COLUMN:
        return torch.cat(shards, dim=0)
    if shard is Shard.ROW:
        return torch.cat(shards, dim=1)
    if shard is Shard.GATED_COLUMN:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if shard is Shard.VOCAB:
        full = torch.cat(shards, dim=0) if len(shards) > 1 else shards[0]
        return full[:rows] if rows is not None else full
    raise AssertionError(shard)


def merge_gathered(gathered: torch.Tensor, shard: Shard, *, rows: int | None = None) -> torch.Tensor:
    """Like :func:`merge_tp` for shards stacked on a new leading axis (the output of an all-gather).

    COLUMN and VOCAB merge as views of ``gathered`` (no copy); ROW and GATED_COLUMN need one copy.
    """
    tp, rest = gathered.shape[0], gathered.shape[1:]
    if shard in (Shard.COLUMN, Shard.VOCAB):
        full = gathered.reshape(tp * rest[0], *rest[1:])
        return full[:rows] if rows is not None else full
    if shard is Shard.ROW:
        return gathered.transpose(0, 1).reshape(rest[0], tp * rest[1], *rest[2:])
    if shard is Shard.GATED_COLUMN:
        halves = gathered.reshape(tp, 2, rest[0] // 2, *rest[1:])  # (tp, [gate|up], I/tp, H)
        return halves.transpose(0, 1).reshape(tp * rest[0], *rest[1:])
    if shard is Shard.REPLICATED:
        return gathered[0]
    raise AssertionError(shard)
