"""Loss aggregation as per-token weights, computed ONCE per optimizer step from the GLOBAL batch.

The loss of any micro-batch is ``sum_t token_weight[t] * per_token_loss[t]``. Because every weight already
carries its global denominator, summing micro-batch losses over micro-batches and data-parallel ranks gives
the global loss exactly, and the gradient does not depend on how the batch was split (micro-batching, DP,
PP, TP): invariance by construction, with no per-micro-batch renormalization.

Modes (``LossConfig.aggregation``), for the loss tokens (SFT and RL tokens alike) of sequence i:

    drgrpo      w = 1 / (max_response_len * num_seqs)          Dr.GRPO constant normalizer (the paper)
    token_mean  w = 1 / num_loss_tokens                         every token of the batch counts the same
    seq_mean    w = 1 / (num_loss_tokens_i * num_nonempty_seqs) mean over sequences of per-sequence means
    fsdp_sum    w = 1 / (max_response_len * reference_world_size)   the official verl/FSDP actor

``fsdp_sum`` is the official code's scale (Su-my/TRAPO, verl/trapo_src/mix_core_alg.py:290-291): each rank
sums its tokens' losses over the padded response width, in a single gradient-accumulation step, and FSDP
averages the ranks' gradients. It depends on the world size of the REFERENCE run (8 GPUs), not on ours.

``num_seqs`` counts every sequence of the global batch (rows without loss tokens included);
``num_nonempty_seqs`` only those with at least one loss token. When each data-parallel rank builds the
weights for its own shard, it passes the global :class:`BatchCounts` (``BatchCounts.of(local).as_tensor()``
all-reduced with SUM, then ``BatchCounts.from_tensor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AggregationMode = Literal["drgrpo", "token_mean", "seq_mean", "fsdp_sum"]


@dataclass(frozen=True)
class BatchCounts:
    """Counts of one optimizer step's batch, 0-d tensors (sum them over data-parallel ranks)."""

    num_seqs: torch.Tensor
    """Sequences in the batch, with or without loss tokens."""
    num_loss_tokens: torch.Tensor
    """Tokens that carry a loss (SFT or RL)."""
    num_nonempty_seqs: torch.Tensor
    """Sequences with at least one loss token."""

    @classmethod
    def of(cls, loss_mask: torch.Tensor) -> BatchCounts:
        """Counts of ``loss_mask`` ``[N, L]`` bool (one row per sequence, padding False)."""
        per_seq = loss_mask.sum(dim=-1)
        return cls(
            num_seqs=torch.tensor(float(loss_mask.shape[0]), device=loss_mask.device),
            num_loss_tokens=per_seq.sum().float(),
            num_nonempty_seqs=(per_seq > 0).sum().float(),
        )

    def as_tensor(self) -> torch.Tensor:
        """``[3]`` float tensor, to all-reduce across data-parallel ranks."""
        return torch.stack([self.num_seqs, self.num_loss_tokens, self.num_nonempty_seqs]).float()

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> BatchCounts:
        return cls(num_seqs=t[0], num_loss_tokens=t[1], num_nonempty_seqs=t[2])


def _width(mode: str, max_response_len: int | None) -> int:
    if max_response_len is None or max_response_len <= 0:
        raise ValueError(
            f"aggregation={mode!r} needs max_response_len > 0 (the rollout's max response length)"
        )
    return max_response_len


def _drgrpo(loss_mask: torch.Tensor, counts: BatchCounts, max_response_len: int | None,
            reference_world_size: int) -> torch.Tensor:
    """Dr.GRPO: ``1 / (max_response_len * num_seqs)`` on every loss token; the denominator is a constant of
    the run (the generation budget), so a token's weight never depends on the length of its sequence."""
    return loss_mask / (_width("drgrpo", max_response_len) * counts.num_seqs.clamp(min=1))


def _fsdp_sum(loss_mask: torch.Tensor, counts: BatchCounts, max_response_len: int | None,
              reference_world_size: int) -> torch.Tensor:
    """The official actor: ``1 / (max_response_len * reference_world_size)``, whatever the batch holds."""
    return loss_mask / (_width("fsdp_sum", max_response_len) * reference_world_size)


def _token_mean(loss_mask: torch.Tensor, counts: BatchCounts, max_response_len: int | None,
                reference_world_size: int) -> torch.Tensor:
    """Token mean: ``1 / num_loss_tokens`` (global), so long sequences weigh more in total."""
    return loss_mask / counts.num_loss_tokens.clamp(min=1)


def _seq_mean(loss_mask: torch.Tensor, counts: BatchCounts, max_response_len: int | None,
              reference_world_size: int) -> torch.Tensor:
    """Sequence mean of token means: ``1 / (num_loss_tokens_i * num_nonempty_seqs)`` (GRPO's original)."""
    per_seq = loss_mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return loss_mask / (per_seq * counts.num_nonempty_seqs.clamp(min=1))


AGGREGATIONS = {"drgrpo": _drgrpo, "token_mean": _token_mean, "seq_mean": _seq_mean, "fsdp_sum": _fsdp_sum}
"""Per-token weight rules by the name ``LossConfig.aggregation`` takes."""


def token_weights(
    loss_mask: torch.Tensor,
    mode: AggregationMode,
    *,
    max_response_len: int | None = None,
    counts: BatchCounts | None = None,
    reference_world_size: int = 1,
) -> torch.Tensor:
    """Aggregation weights ``[N, L]`` fp32 for ``loss_mask`` ``[N, L]`` bool (SFT | RL loss positions of each
    sequence), 0 outside the mask.

    ``counts`` are the GLOBAL batch counts; leave it None when ``loss_mask`` is the whole global batch.
    ``max_response_len`` (the rollout's maximum response length) is needed for ``drgrpo`` and ``fsdp_sum``;
    ``reference_world_size`` (the data-parallel size of the run being reproduced) is read by ``fsdp_sum`` only.
    """
    if reference_world_size < 1:
        raise ValueError(f"reference_world_size must be >= 1, got {reference_world_size}")
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {mode!r}")
    loss_mask = loss_mask.to(torch.bool)
    counts = counts if counts is not None else BatchCounts.of(loss_mask)
    return AGGREGATIONS[mode](loss_mask.float(), counts, max_response_len, reference_world_size)
