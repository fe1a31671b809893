"""One step's metrics, from the whole step's rollouts (every rank holds them) and the policy's loss sums (already
reduced over the global batch): no collective here. Each metric says what it is normalized by."""

from __future__ import annotations

from typing import Any

import torch

from trapo_megatron.algo.advantages import reward_stats
from trapo_megatron.algo.loss import finalize_metrics
from trapo_megatron.rollout.waves import Rollout, WaveStats

LOSS_KEYS = ("loss", "grad_norm", "lr", "sft_tokens", "rl_tokens", "prefix_p_mean", "prefix_outside_trust_region",
             "entropy_mean", "clip_fraction", "logprob_gap_mean", "tis_truncated_fraction", "update_skipped")


def step_metrics(groups: list[list[Rollout]], waves: WaveStats, sums: dict[str, float],
                 step_seconds: float) -> dict[str, Any]:
    """Rewards and lengths over UNGUIDED samples (the paper's report), guidance rate per micro-group
    (fraction of prompts guided), loss statistics (means over their own token counts), throughput."""
    flat = [r for g in groups for r in g]
    stats = reward_stats(torch.tensor([r.reward for r in flat]), torch.tensor([r.guided for r in flat]),
                         torch.tensor([float(len(r.response_ids)) for r in flat]))
    unguided, samples, prompts = float(stats["num_unguided"]), float(len(flat)), float(len(groups))
    loss = {k: float(v) for k, v in finalize_metrics({k: torch.tensor(v) for k, v in sums.items()}).items()}
    out: dict[str, Any] = {
        "reward_unguided": float(stats["reward_sum"]) / max(unguided, 1.0),  # mean over unguided samples
        "response_len_unguided": float(stats["response_len_sum"]) / max(unguided, 1.0),  # mean over unguided
        "guided_fraction": 1.0 - unguided / max(samples, 1.0),  # fraction of samples with a prefix
        **{f"guided_mg{i + 1}": n / max(prompts, 1.0) for i, n in enumerate(waves.guided_prompts)},  # of prompts
        "tokens_per_s": sums["num_tokens"] / max(step_seconds, 1e-9),  # trained tokens / step time
        "engine_calls": waves.num_engine_calls,  # distinct generate calls, summed over engine replicas
        "time_generate": waves.generate_seconds,  # inside time_rollout (the slowest replica)
        "time_reward": waves.score_seconds,  # inside time_rollout (the slowest replica)
    }
    out.update({k: loss[k] for k in LOSS_KEYS if k in loss})
    return out
