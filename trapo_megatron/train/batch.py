"""From scored rollouts to packed, weighted micro-batches: the bridge between the paper's groups and the
Megatron step.

Per sample: tokens = prompt + expert prefix + continuation; the prefix targets carry the prefix objective
(TrSFT) iff the sample carries its shared prefix's SFT loss, the continuation targets carry the policy
gradient; the aggregation weight of every loss token already holds the GLOBAL denominator (counts over the
whole step's batch, which every rank holds after the rollout hand-over: no reduction needed), so
micro-batches and data-parallel shares can be cut any way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trapo_megatron.algo.advantages import ADVANTAGES
from trapo_megatron.algo.aggregation import BatchCounts, token_weights
from trapo_megatron.algo.loss import LossConfig
from trapo_megatron.algo.masks import loss_masks, shift_labels, token_roles
from trapo_megatron.algo.official_micro_batches import official_entropy_weights
from trapo_megatron.data.packing import pack_row, plan_micro_batches
from trapo_megatron.rollout.waves import Rollout

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


def advantages_of(groups: list[list[Rollout]], cfg: LossConfig) -> torch.Tensor:
    """Sequence advantages [N] over the flattened groups (a group = the G samples of one prompt)."""
    rewards = torch.tensor([r.reward for g in groups for r in g], dtype=torch.float32)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    if cfg.advantage == "grpo":
        return ADVANTAGES["grpo"](rewards, group_ids, cfg.advantage_eps)
    return ADVANTAGES[cfg.advantage](rewards, group_ids)


def to_sequence(r: Rollout, advantage: float) -> Sequence:
    tokens = torch.tensor(r.prompt_ids + r.prefix_ids + r.continuation_ids, dtype=torch.long)
    length = len(tokens)
    roles = token_roles(torch.tensor([len(r.prompt_ids)]), torch.tensor([len(r.prefix_ids)]),
                        torch.tensor([len(r.continuation_ids)]), length)
    sft_mask, rl_mask = (m[0] for m in loss_masks(roles, torch.tensor([r.sft_on_prefix])))
    rollout_lp = torch.zeros(length)
    start = len(r.prompt_ids) + len(r.prefix_ids) - 1  # the position that predicts the first continuation token
    if r.continuation_logprobs:
        rollout_lp[start:start + len(r.continuation_logprobs)] = torch.tensor(r.continuation_logprobs)
    response_mask = torch.zeros(length, dtype=torch.bool)
    response_mask[max(len(r.prompt_ids) - 1, 0):length - 1] = True
    return Sequence(tokens=tokens, labels=shift_labels(tokens), sft_mask=sft_mask, rl_mask=rl_mask,
                    advantages=torch.full((length,), float(advantage)), rollout_logprobs=rollout_lp,
                    response_mask=response_mask)


def weigh(seqs: list[Sequence], cfg: LossConfig, max_response_len: int) -> None:
    """Set every sequence's token_weight and entropy_weight from the counts over ``seqs``: pass the whole
    step's batch, in batch order (the official entropy weights depend on it through verl's tie-breaking)."""
    total = torch.zeros(3)
    for s in seqs:
        total += BatchCounts.of((s.sft_mask | s.rl_mask).unsqueeze(0)).as_tensor()
    counts = BatchCounts.from_tensor(total)
    for s in seqs:
        s.token_weight = token_weights((s.sft_mask | s.rl_mask).unsqueeze(0), cfg.aggregation,
                                       max_response_len=max_response_len, counts=counts,
                                       reference_world_size=cfg.reference_world_size)[0]
    if cfg.entropy_mode == "official":
        weights = official_entropy_weights([s.response_mask for s in seqs], [len(s.tokens) for s in seqs],
                                           cfg.reference_world_size, cfg.entropy_micro_batch_tokens)
    else:
        weights = [s.token_weight for s in seqs]
    for s, w in zip(seqs, weights, strict=True):
        s.entropy_weight = w


def data_parallel_share(groups: list, dp_rank: int, dp_size: int) -> list:
    """This data-parallel rank's groups: batch positions dp_rank, dp_rank + dp_size, ..."""
    return groups[dp_rank::dp_size]


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
