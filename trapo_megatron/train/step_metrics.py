"""One step's metrics, from the whole step's totals (reduced in the rollout hand-over) and the policy's loss sums
(already reduced over the global batch): no collective here. Each metric says what it is normalized by."""

from __future__ import annotations

from typing import Any

import torch

from trapo_megatron.algo.loss import finalize_metrics
from trapo_megatron.rollout.handover import StepTotals
from trapo_megatron.rollout.waves import WaveStats

LOSS_KEYS = ("loss", "grad_norm", "lr", "sft_tokens", "rl_tokens", "prefix_p_mean", "prefix_outside_trust_region",
             "entropy_mean", "clip_fraction", "logprob_gap_mean", "tis_truncated_fraction", "update_skipped")


def step_metrics(totals: StepTotals, waves: WaveStats, sums: dict[str, float], step_seconds: float) -> dict[str, Any]:
    """Rewards and lengths over UNGUIDED samples (the paper's report), guidance rate per micro-group
    (fraction of prompts guided), loss statistics (means over their own token counts), throughput."""
    unguided, samples, prompts = totals.num_unguided, totals.num_samples, totals.num_prompts
    loss = {k: float(v) for k, v in finalize_metrics({k: torch.tensor(v) for k, v in sums.items()}).items()}
    out: dict[str, Any] = {
        "reward_unguided": totals.reward_sum_unguided / max(unguided, 1.0),  # mean over unguided samples
        "response_len_unguided": totals.response_len_sum_unguided / max(unguided, 1.0),  # mean over unguided
        "guided_fraction": 1.0 - unguided / max(samples, 1.0),  # fraction of samples with a prefix
        **{f"guided_mg{i + 1}": n / max(prompts, 1.0) for i, n in enumerate(waves.guided_prompts)},  # of prompts
        "tokens_per_s": sums["num_tokens"] / max(step_seconds, 1e-9),  # trained tokens / step time
        "engine_calls": waves.num_engine_calls,  # distinct generate calls, summed over engine replicas
        "time_generate": waves.generate_seconds,  # inside time_rollout (the slowest replica)
        "time_reward": waves.score_seconds,  # inside time_rollout (the slowest replica)
    }
    out.update({k: loss[k] for k in LOSS_KEYS if k in loss})
    return out
