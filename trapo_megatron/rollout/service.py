"""The rollout service: one step's prompts -> every prompt's scored group, on every rank, in one topology for
every engine.

    replicas      the world cut into contiguous blocks of engine.tensor_parallel_size ranks (replicas.py);
    generation    data-parallel over ALL replicas: replica i rolls out positions i, i + R, ... of the step's
                  batch (R replicas), so the step has R distinct rollout streams;
    grading       once per replica, on its leader, broadcast to the replica's ranks before the next wave is
                  decided: a reward-pool timeout (wall clock) can never make two ranks of a replica diverge;
    hand-over     each rank receives from the leaders only its data-parallel share, as flat tensors in
                  batch-position order (handover.py), so the ranks of a data-parallel rank hold byte-identical
                  groups ordered only by (seed, step), never by which replica finished first; the step's
                  totals (aggregation counts, metric sums) come from one all-reduce.

vLLM (SPMD: every rank of a replica runs the engine) and the CPU twin (ReplicaCpuEngine: the leader runs the
model) take the same path through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron import faults
from trapo_megatron.algo.micro_groups import MicroGroupConfig
from trapo_megatron.data.dataset import Example
from trapo_megatron.rollout.engine import RolloutEngine, SamplingParams
from trapo_megatron.rollout.handover import (
    Samples,
    StepLengths,
    StepTotals,
    exchange,
    reduce_step,
    step_lengths,
)
from trapo_megatron.rollout.replicas import ReplicaLayout, broadcast_from_leader
from trapo_megatron.rollout.waves import RolloutConfig, Scorer, WaveStats, run_waves, stop_token_ids


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
    """What one rank holds of the step's rollouts after the hand-over."""

    share: Samples
    """This data-parallel rank's groups (batch positions dp_rank, dp_rank + dp_size, ...)."""
    totals: StepTotals
    """Sums over the whole step."""
    lengths: StepLengths
    """Every sample's lengths, the whole step's (for the official entropy mode's micro-batches)."""
    stats: WaveStats
    """Counts summed over replicas (engine calls: distinct generate calls of the step); seconds: the slowest
    replica's (wall time)."""


class RolloutService:
    """Rolls out a step's batch (and the held-out set) over every engine replica; see the module docstring.

    ``host_group``: a gloo group over the whole world (platform.host_group()) for the hand-over;
    ``dp_rank`` / ``dp_size``: this rank's place in the trainer's data parallelism. Collective (every rank
    learns every rank's data-parallel rank).
    """

    def __init__(self, engine: RolloutEngine, scorer: ReplicaScorer, layout: ReplicaLayout, host_group: Any, *,
                 tokenizer: Any, rollout: RolloutConfig, schedule: MicroGroupConfig, dp_rank: int,
                 dp_size: int) -> None:
        self.engine, self.scorer, self.layout, self.host_group = engine, scorer, layout, host_group
        self.tokenizer, self.rollout, self.schedule = tokenizer, rollout, schedule
        self.dp_size = dp_size
        every = [torch.zeros(1, dtype=torch.long) for _ in range(layout.world_size)]
        dist.all_gather(every, torch.tensor([dp_rank]), group=host_group)
        self.dp_ranks = [int(t) for t in every]

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
        leader = self.layout.is_leader
        mine = Samples.from_rollouts(groups, positions) if leader else None
        guided = torch.tensor([r.guided for g in groups for r in g], dtype=torch.bool) if leader else None
        totals, stats = reduce_step(mine, guided, stats, self.host_group)
        share = exchange(mine, len(batch), self.layout, self.dp_ranks, self.dp_size, self.host_group)
        return StepRollouts(share=share, totals=totals, lengths=step_lengths(mine, len(batch), self.host_group),
                            stats=stats)

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
        total = torch.tensor([correct if self.layout.is_leader else 0.0], dtype=torch.float64)
        if self.layout.world_size > 1:
            dist.all_reduce(total, group=self.host_group)  # the leaders' counts
        return total.item() / len(examples)

    def close(self) -> None:
        self.scorer.close()
        self.engine.close()
