"""Continuation-token objective: the GRPO policy gradient (Dr.GRPO flavour), clipping, TIS, entropy bonus.

Per continuation token t of a sample with advantage A (the same A for all its tokens):

    ratio_t = exp(logp_t - old_logp_t)                              1 on a single on-policy update
    loss_t  = max(-A ratio_t, -A clip(ratio_t, 1 - eps_low, 1 + eps_high)) * tis_t
    tis_t   = min(exp(old_logp_t - rollout_logp_t), tis_cap)        (detached; 1 when TIS is off)

No KL term and no reference model (Dr.GRPO). ``tis_t`` is truncated importance sampling against the
rollout engine's log-probabilities, which corrects the train/inference mismatch (the engine samples from a
slightly different distribution than the trainer computes). The per-token losses are summed with the
aggregation weights of ``aggregation.py``; all inputs are ``[T]`` and ``mask`` [T] bool selects the
continuation tokens (elsewhere the loss is 0 and no gradient flows, whatever garbage the inputs hold there).
"""

from __future__ import annotations

import torch


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


def policy_gradient_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float | None = None,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss [T], clipped [T] bool): the PPO-clipped surrogate ``max(-A r, -A clip(r))``.

    ``clip_low``/``clip_high`` are epsilons (ratio bounds 1 - clip_low, 1 + clip_high); None leaves that side
    open, both None is the plain policy gradient ``-A r``. A token is "clipped" when the clipped branch is
    the active one and differs from the unclipped one (its gradient is then 0).
    """
    ratio = torch.exp(_masked(logp - old_logp, mask))
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    if clip_low is None and clip_high is None:
        return _masked(unclipped, mask), torch.zeros_like(mask)
    lo = None if clip_low is None else 1.0 - clip_low
    hi = None if clip_high is None else 1.0 + clip_high
    clipped_loss = -adv * torch.clamp(ratio, lo, hi)
    clipped = (clipped_loss > unclipped) & mask
    return _masked(torch.maximum(unclipped, clipped_loss), mask), clipped


def tis_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T], truncated [T] bool): ``min(pi_old / pi_rollout, cap)`` on masked tokens, detached; 1
    elsewhere. Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training")."""
    ratio = torch.exp(_masked(old_logp.detach() - rollout_logp, mask))
    return ratio.clamp(max=cap), (ratio > cap) & mask


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token ``-coef * H_t`` on masked tokens (0 elsewhere): maximizing entropy over response tokens
    (the official TRAPO code uses coef 0.001 over all response tokens)."""
    return _masked(-coef * entropy, mask)
