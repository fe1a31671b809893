"""The rollout service: one step's prompts -> every prompt's scored group, on every rank, in one topology for
every engine.

    replicas      the world cut into contiguous blocks of engine.tensor_parallel_size ranks (replicas.py);
    generation    data-parallel over ALL replicas: replica i rolls out positions i, i + R, ... of the step's
                  batch (R replicas), so the step has R distinct rollout streams;
    grading       once per replica, on its leader, broadcast to the replica's ranks before the next wave is
                  decided: a reward-pool timeout (wall clock) can never make two ranks of a replica diverge;
    hand-over     the leaders' results are gathered over the host group and put back in batch-position
                  order, so every rank holds byte-identical groups ordered only by (seed, step), never by
                  which replica finished first. Each data-parallel rank trains on its own share of them.

vLLM (SPMD: every rank of a replica runs the engine) and the CPU twin (ReplicaCpuEngine: the leader runs the
model) take the same path through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from trapo_megatron.algo.micro_groups import MicroGroupConfig
from trapo_megatron.data.dataset import Example
from trapo_megatron.rollout.engine import RolloutEngine, SamplingParams
from trapo_megatron.rollout.replicas import ReplicaLayout, broadcast_from_leader
from trapo_megatron.rollout.waves import Rollout, RolloutConfig, Scorer, WaveStats, run_waves, stop_token_ids
from trapo_megatron.train import faults


class ReplicaScorer:
    """Grades on the replica's leader (the only rank with a reward pool) and broadcasts the rewards, so every
    rank of the replica decides the next micro-groups from the same numbers. A ``Scorer`` for ``run_waves``."""

    def __init__(self, scorer: Scorer | None, layout: ReplicaLayout, group: Any) -> None:
        if (scorer is None) == layout.is_leader:
            raise ValueError("ReplicaScorer: the replica leader, and only it, holds the reward pool")
        self.scorer, self.layout, self.group = scorer, layout, group

    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        scores = self.scorer.score(responses, golds) if self.scorer is not None else None
        scores = broadcast_from_leader(scores, self.layout, self.group)
        faults.fire("rollout")  # mid-rollout: a wave graded, the next one not yet decided
        return scores

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


@dataclass
class StepRollouts:
    """The whole step's rollouts, identical on every rank."""

    groups: list[list[Rollout]]
    """Per batch position, the prompt's G samples in sample order."""
    stats: WaveStats
    """Counts summed over replicas (engine calls: distinct generate calls of the step); seconds: the slowest
    replica's (wall time)."""


def merge_stats(parts: Sequence[WaveStats]) -> WaveStats:
    """One step's WaveStats from every replica's: counts add up, seconds are the slowest replica's."""
    guided = [sum(col) for col in zip(*(p.guided_prompts for p in parts), strict=True)]
    return WaveStats(
        num_engine_calls=sum(p.num_engine_calls for p in parts), num_generated=sum(p.num_generated for p in parts),
        num_expert_only=sum(p.num_expert_only for p in parts), guided_prompts=guided,
        generate_seconds=max(p.generate_seconds for p in parts), score_seconds=max(p.score_seconds for p in parts),
    )


class RolloutService:
    """Rolls out a step's batch (and the held-out set) over every engine replica; see the module docstring.

    ``host_group``: a gloo group over the whole world (platform.host_group()) for the hand-over.
    """

    def __init__(self, engine: RolloutEngine, scorer: ReplicaScorer, layout: ReplicaLayout, host_group: Any, *,
                 tokenizer: Any, rollout: RolloutConfig, schedule: MicroGroupConfig) -> None:
        self.engine, self.scorer, self.layout, self.host_group = engine, scorer, layout, host_group
        self.tokenizer, self.rollout, self.schedule = tokenizer, rollout, schedule

    def load_weights(self, stream: Any) -> None:
        """Refit the engine (every rank: the stream is collective); it is awake afterwards (the only way back
        from sleep: sleep discards the weights)."""
        self.engine.load_weights(stream)

    def roll_out(self, batch: Sequence[Example], step: int) -> StepRollouts:
        """Micro-group waves over this replica's positions of ``batch`` (the engine is awake from the last
        refit), then the hand-over; the engine sleeps afterwards to leave memory to training."""
        positions = self.layout.positions(len(batch))
        self.engine.wake_up()
        groups, stats = run_waves([batch[p] for p in positions], schedule=self.schedule, engine=self.engine,
                                  scorer=self.scorer, tokenizer=self.tokenizer, cfg=self.rollout, step=step,
                                  positions=positions)
        self.engine.sleep()
        parts = self._from_leaders((list(positions), groups, stats))
        by_position = {p: g for pos, gs, _ in parts for p, g in zip(pos, gs, strict=True)}
        return StepRollouts(groups=[by_position[p] for p in range(len(batch))],
                            stats=merge_stats([s for _, _, s in parts]))

    def evaluate(self, examples: Sequence[Example], max_new_tokens: int) -> float:
        """Greedy accuracy over ``examples``, each replica answering its share (graded on its leader)."""
        positions = self.layout.positions(len(examples))
        stop = stop_token_ids(self.tokenizer, self.rollout)
        params = [SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=p, stop_token_ids=stop)
                  for p in positions]
        correct = 0.0
        if positions:
            self.engine.wake_up()  # evaluation follows a refit; the next rollout needs these weights too
            outs = self.engine.generate([examples[p].prompt_ids for p in positions], params)
            texts = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
            correct = sum(self.scorer.score(texts, [examples[p].answer for p in positions]))
        return sum(self._from_leaders(correct)) / len(examples)

    def _from_leaders(self, obj: Any) -> list[Any]:
        """Every replica leader's ``obj``, in replica order, on every rank (host group, picklable objects)."""
        world = dist.get_world_size(self.host_group)
        if world == 1:
            return [obj]
        every: list[Any] = [None] * world
        dist.all_gather_object(every, obj if self.layout.is_leader else None, group=self.host_group)
        return [every[r] for r in range(0, world, self.layout.tensor_parallel_size)]

    def close(self) -> None:
        self.scorer.close()
        self.engine.close()
