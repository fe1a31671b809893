"""From scored rollouts to packed, weighted micro-batches: the bridge between the paper's groups and the
Megatron step.

Per sample: tokens = prompt + expert prefix + continuation; the prefix targets carry the prefix objective
(TrSFT) iff the sample carries its shared prefix's SFT loss, the continuation targets carry the policy
gradient; the aggregation weight of every loss token already holds the GLOBAL denominator (counts over the
whole step's batch, which the rollout hand-over's all-reduce gives every rank), so micro-batches and
data-parallel shares can be cut any way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trapo_megatron.algo.advantages import ADVANTAGES
from trapo_megatron.algo.aggregation import BatchCounts, token_weights
from trapo_megatron.algo.loss import LossConfig
from trapo_megatron.algo.masks import loss_masks, shift_labels, token_roles
from trapo_megatron.algo.official_micro_batches import official_entropy_scales
from trapo_megatron.data.packing import pack_row, plan_micro_batches
from trapo_megatron.rollout.handover import Sample, Samples, StepLengths

PER_TOKEN_KEYS = ("labels", "sft_mask", "rl_mask", "advantages", "token_weight", "entropy_weight",
                  "rollout_logprobs")


@dataclass
class Sequence:
    """One training sequence, every tensor (L,) for L = len(tokens)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    sft_mask: torch.Tensor
    rl_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logprobs: torch.Tensor
    response_mask: torch.Tensor
    """Positions that predict a response token (expert prefix and continuation, with or without a loss)."""
    token_weight: torch.Tensor | None = None
    entropy_weight: torch.Tensor | None = None


def advantages_of(samples: Samples, cfg: LossConfig) -> torch.Tensor:
    """Sequence advantages [N] over the groups of ``samples`` (a group = the G samples of one prompt; a group's
    advantages depend on its own samples only, so a data-parallel share computes its own)."""
    if cfg.advantage == "grpo":
        return ADVANTAGES["grpo"](samples.rewards, samples.group_ids, cfg.advantage_eps)
    return ADVANTAGES[cfg.advantage](samples.rewards, samples.group_ids)


def to_sequence(s: Sample, advantage: float) -> Sequence:
    tokens = s.tokens.long()
    length = len(tokens)
    continuation_len = length - s.prompt_len - s.prefix_len
    roles = token_roles(torch.tensor([s.prompt_len]), torch.tensor([s.prefix_len]), torch.tensor([continuation_len]),
                        length)
    sft_mask, rl_mask = (m[0] for m in loss_masks(roles, torch.tensor([s.sft_on_prefix])))
    rollout_lp = torch.zeros(length)
    start = s.prompt_len + s.prefix_len - 1  # the position that predicts the first continuation token
    if len(s.logprobs):
        rollout_lp[start:start + len(s.logprobs)] = s.logprobs
    response_mask = torch.zeros(length, dtype=torch.bool)
    response_mask[max(s.prompt_len - 1, 0):length - 1] = True
    return Sequence(tokens=tokens, labels=shift_labels(tokens), sft_mask=sft_mask, rl_mask=rl_mask,
                    advantages=torch.full((length,), float(advantage)), rollout_logprobs=rollout_lp,
                    response_mask=response_mask)


def sequences(samples: Samples, cfg: LossConfig, max_response_len: int, counts: BatchCounts,
              lengths: StepLengths | None = None) -> list[Sequence]:
    """Training sequences of ``samples``, every token weighted by the whole step's ``counts``; the entropy
    bonus weighted like the loss, or (``loss.entropy_mode=official``) by the official micro-batches rebuilt
    from the whole step's ``lengths`` (their tie-breaking follows batch order)."""
    seqs = [to_sequence(s, a) for s, a in zip(samples, advantages_of(samples, cfg).tolist(), strict=True)]
    for s in seqs:
        s.token_weight = token_weights((s.sft_mask | s.rl_mask).unsqueeze(0), cfg.aggregation,
                                       max_response_len=max_response_len, counts=counts,
                                       reference_world_size=cfg.reference_world_size)[0]
        s.entropy_weight = s.token_weight
    if cfg.entropy_mode == "official":
        if lengths is None:
            raise ValueError("loss.entropy_mode=official needs the whole step's lengths (StepLengths)")
        scales = official_entropy_scales(lengths.lengths.tolist(), lengths.response_lens.tolist(),
                                         cfg.reference_world_size, cfg.entropy_micro_batch_tokens)
        for s, i in zip(seqs, lengths.indices_of(samples).tolist(), strict=True):
            s.entropy_weight = s.response_mask.float() * scales[i]
    return seqs


def micro_batches(seqs: list[Sequence], max_tokens: int) -> list[dict]:
    """Pack sequences into micro-batches of at most ``max_tokens`` tokens: ``tokens``, ``position_ids``,
    ``cu_seqlens`` and the per-token loss inputs, concatenated."""
    out = []
    for idx in plan_micro_batches([len(s.tokens) for s in seqs], max_tokens):
        group = [seqs[i] for i in idx]
        mb = pack_row([s.tokens for s in group])
        for key in PER_TOKEN_KEYS:
            mb[key] = torch.cat([getattr(s, key) for s in group])
        out.append(mb)
    return out
