"""Prefix-token (expert) objectives: TrSFT and the ablations the paper compares it with.

Each takes ``logp`` ``[T]`` (log-probabilities of the expert tokens under the current policy, fp32) and
returns a per-token loss ``[T]``. The loss of a micro-batch sums these over ``sft_mask`` tokens with the
aggregation weights of ``aggregation.py`` (Dr.GRPO: ``1 / (max_response_len * num_seqs_global)``), the same
weights the continuation tokens get. Written with ``p = exp(logp)``:

    name    per-token loss                                    d loss / d p
    trsft   -log p (p >= a);  1 - log a - p / a (p < a)       -1 / max(p, a)      TRAPO, a = 0.1
    sft     -log p                                            -1 / p              naive ablation (collapses)
    luffy   -p / (p + g)                                      -g / (p + g)^2      LUFFY shaping, g = 0.1
    none    0                                                 0                   pure RL (GRPO + micro-group)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from trapo_megatron.algo.loss import LossConfig

PrefixObjective = Literal["trsft", "sft", "luffy", "none"]


def trsft(logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """Trust-region SFT (TRAPO, arXiv 2512.17636): gradient ``-(1 / max(p, alpha)) dp`` per expert token.

    Inside the trust region (p >= alpha) this is plain SFT, ``-log p``; outside, the pull toward a far-away
    expert mode is capped at ``-dp / alpha`` (forward KL -> reverse-KL-like, mode seeking). The value is the
    potential of that gradient, ``1 - log(alpha) - p / alpha`` for p < alpha, continuous at p = alpha, so the
    reported loss equals the SFT loss inside the region. Same gradient as the surrogate
    ``-p / max(p.detach(), alpha)``.
    """
    p = logp.exp()
    return torch.where(p >= alpha, -logp, (1.0 - math.log(alpha)) - p / alpha)


def sft(logp: torch.Tensor) -> torch.Tensor:
    """Standard SFT on the prefix, ``-log p`` (gradient ``-dp / p``): the naive ablation (32.3 Five-Math avg
    in the paper, a collapse: rare expert tokens get unbounded weight)."""
    return -logp


def luffy(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY's policy shaping (Yan et al. 2025) on the prefix: ``-p / (p + gamma)``, gradient
    ``-(gamma / (p + gamma)^2) dp``: low-probability expert tokens get weight up to 1/gamma."""
    p = logp.exp()
    return -p / (p + gamma)


def none(logp: torch.Tensor) -> torch.Tensor:
    """No loss on prefix tokens (pure RL on continuations; the prefix only conditions the rollout)."""
    return torch.zeros_like(logp)


PREFIX_OBJECTIVES: dict[str, Callable[[torch.Tensor, LossConfig], torch.Tensor]] = {
    "trsft": lambda logp, cfg: trsft(logp, cfg.trsft_alpha),
    "sft": lambda logp, cfg: sft(logp),
    "luffy": lambda logp, cfg: luffy(logp, cfg.luffy_gamma),
    "none": lambda logp, cfg: none(logp),
}
"""Per-token prefix losses by the name ``LossConfig.prefix_objective`` takes."""
