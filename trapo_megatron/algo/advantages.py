"""Sequence advantages (Dr.GRPO, classic GRPO) and reward statistics that leave guided samples out.

Groups are the G samples of one prompt, guided ones included: TRAPO computes the group mean over all of
them on purpose (as the official code does), so a guided sample that succeeds raises the bar for the rest.
All functions take ``rewards [N]`` float and ``group_ids [N]`` long (any ids; samples with equal ids form a
group) and return ``[N]``; no ``.item()``: everything stays on the device.
"""

from __future__ import annotations

import torch


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniques, index = torch.unique(group_ids, return_inverse=True)
    return index, uniques.numel()


def _group_mean(
    values: torch.Tensor, index: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample mean of its group [N], per-sample group size [N])."""
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, index, torch.ones_like(values)
    )
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return (sums / counts)[index], counts[index]


def drgrpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO: ``A_i = r_i - mean_{j in group(i)} r_j`` (no std division; Liu et al. 2025, "Understanding
    R1-Zero-like training"). The mean is over ALL samples of the prompt, guided ones included."""
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    index, num_groups = _group_index(group_ids)
    mean, _ = _group_mean(rewards, index, num_groups)
    return rewards - mean


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Classic GRPO: ``A_i = (r_i - mean_g r) / (std_g r + eps)``, std with Bessel's correction (torch.std).

    A group of one sample has no spread: its advantage is 0.
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    index, num_groups = _group_index(group_ids)
    mean, counts = _group_mean(rewards, index, num_groups)
    centered = rewards - mean
    sq, _ = _group_mean(centered * centered, index, num_groups)
    var = sq * counts / (counts - 1).clamp(min=1)
    return torch.where(counts > 1, centered / (var.sqrt() + eps), torch.zeros_like(centered))


ADVANTAGES = {"drgrpo": drgrpo_advantages, "grpo": grpo_advantages}
"""Advantage estimators by the name ``LossConfig.advantage`` takes."""


def reward_stats(
    rewards: torch.Tensor, guided_mask: torch.Tensor, response_lens: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Reward (and length) statistics over UNGUIDED samples only, as the paper reports them.

    Returns 0-d tensors: ``num_unguided``, ``reward_sum`` (normalized by num_unguided -> mean reward),
    ``reward_mean``, ``reward_std`` (population), ``guided_fraction`` (over all N samples), and with
    ``response_lens`` [N] ``response_len_sum`` and ``response_len_mean`` (over unguided samples). Means are 0
    when every sample was guided.
    """
    keep = ~guided_mask.to(torch.bool)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    num = keep.sum().to(r.dtype)
    denom = num.clamp(min=1)
    total = torch.where(keep, r, torch.zeros_like(r)).sum()
    mean = total / denom
    var = torch.where(keep, (r - mean) ** 2, torch.zeros_like(r)).sum() / denom
    stats = {
        "num_unguided": num,
        "reward_sum": total,
        "reward_mean": mean,
        "reward_std": var.sqrt(),
        "guided_fraction": (~keep).sum().to(r.dtype) / max(r.numel(), 1),
    }
    if response_lens is not None:
        lens = torch.where(keep, response_lens.to(r.dtype), torch.zeros_like(r)).sum()
        stats["response_len_sum"] = lens
        stats["response_len_mean"] = lens / denom
    return stats
