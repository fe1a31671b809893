"""Reward-pool accounting per step: how many rollout responses the pools graded and how many of them a
timeout, a kill at the backstop, a crashed worker or a math-verify error scored 0 (each counted by
reward/math_reward.py's RewardStats), summed over every replica's pool. Held-out grading is not counted."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron.megatron import platform

COUNTERS = ("num_graded", "num_timeouts", "num_killed", "num_crashes", "num_errors")


class RewardCounters:
    """``pool``: this rank's reward pool (None on ranks without one: they contribute zeros)."""

    def __init__(self, pool: Any | None) -> None:
        self.pool = pool
        self._start = self._read()

    def _read(self) -> list[int]:
        return [getattr(self.pool.stats, k) for k in COUNTERS] if self.pool is not None else [0] * len(COUNTERS)

    def start(self) -> None:
        """Mark the beginning of a step's grading."""
        self._start = self._read()

    def finish(self) -> dict[str, int]:
        """``reward_<counter>`` since :meth:`start`, summed over all pools (collective over the host group)."""
        delta = torch.tensor([now - then for now, then in zip(self._read(), self._start, strict=True)],
                             dtype=torch.float64)
        dist.all_reduce(delta, group=platform.host_group())
        return {f"reward_{k}": int(v) for k, v in zip(COUNTERS, delta.tolist(), strict=True)}
