"""The TRAPO loop, as the paper tells it:

    sample prompts -> roll out in micro-group waves over every engine replica (reward after each wave decides
    the next guidance) -> advantages -> double update (TrSFT on expert prefixes, Dr.GRPO on continuations)
    -> sync weights -> log -> save

Megatron lives behind ``MegatronPolicy``; the engine behind the rollout service; the pieces are built in
train/setup.py. Each phase is timed by name. With ``engine.offload_during_rollout`` the training state
leaves device memory from before the weight sync (the engine wakes) until the rollouts are done.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trapo_megatron import faults
from trapo_megatron.config import to_dict
from trapo_megatron.plot import plot_run
from trapo_megatron.rollout.service import StepRollouts
from trapo_megatron.train import batch as batching
from trapo_megatron.train.accounting import RewardCounters
from trapo_megatron.train.checkpointing import Checkpointer
from trapo_megatron.train.config import TrapoConfig
from trapo_megatron.train.export import export_hf
from trapo_megatron.train.loggers import build_sinks
from trapo_megatron.train.metrics import MetricsLogger
from trapo_megatron.train.setup import Run, build_run
from trapo_megatron.train.step_metrics import step_metrics
from trapo_megatron.train.stopping import SkipGuard, StopSignals


class Trainer:
    def __init__(self, cfg: TrapoConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.stop = StopSignals(cfg.run.stop_signals)  # first: a signal during start-up stops after step one
        self.run: Run = build_run(cfg)
        self.out = Path(cfg.run.output_dir)
        self.ckpt = Checkpointer(self.out / "checkpoints", self.run.policy)
        state = self.ckpt.resume() if (resume or cfg.checkpoint.resume) else None
        self.step = state["step"] if state else 0
        self.guard = SkipGuard(cfg.run.max_consecutive_skips, state)
        self.reward_counters = RewardCounters(self.run.rollout.scorer.scorer)
        self.log = MetricsLogger(self.out, enabled=self.run.is_rank0, total_steps=cfg.run.max_steps,
                                 start_step=self.step, progress=cfg.run.progress,
                                 sinks=lambda start: build_sinks(cfg.logging, self.out, to_dict(cfg), start))
        self.times: dict[str, float] = {}
        self.offloaded_bytes = 0

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        if self.step >= cfg.run.max_steps:  # a chained or requeued job after the run ended: no re-export
            if run.is_rank0:
                print(f"trapo: {self.out} already ran its {cfg.run.max_steps} steps (run.max_steps); nothing to do",
                      file=sys.stderr, flush=True)
            self.log.close()
            return self.outcome(stopped=False)
        self.sync_weights()  # the engine starts from the checkpoint the policy was (re)loaded from
        first = run.evaluate() if self.step == 0 else None
        if first is not None:
            self.log.log(0, {"heldout_accuracy": first})
        stopped = False
        for step in range(self.step + 1, cfg.run.max_steps + 1):
            self.times = {}
            faults.step_begins(step)
            faults.fire("step_start")
            batch = run.sampler.batch(step)
            with self.timed("rollout"):
                self.reward_counters.start()
                rollouts = run.rollout.roll_out(batch, step)
            with self.timed("restore"):
                run.offload.restore()
            with self.timed("train"):
                sums = self.double_update(rollouts)
            self.guard.update(step, bool(sums["update_skipped"]), run.policy.nonfinite)
            # no periodic save inside a run of skipped steps: `latest` stays at the last applied update
            saving = self.ckpt.due(step, cfg.checkpoint.save_every, cfg.run.max_steps) and not self.guard.num_consecutive
            if saving:
                self.ckpt.save(step)  # before the offload: the optimizer state is saved from the device
            self.sync_weights()
            metrics = step_metrics(rollouts.totals, rollouts.stats, sums, sum(self.times.values()))
            metrics.update(self.reward_counters.finish(), num_generated=rollouts.stats.num_generated,
                           num_skipped_total=self.guard.num_skipped_total)
            if self.eval_due(step):
                with self.timed("eval"):
                    metrics["heldout_accuracy"] = run.evaluate()
            metrics["offloaded_mb"] = self.offloaded_bytes / 2**20  # training state in host memory during rollout
            metrics.update({f"time_{k}": v for k, v in self.times.items()})
            if step % cfg.run.log_every == 0 or step == cfg.run.max_steps:
                self.log.log(step, metrics)
            self.guard.check(step)  # too many non-finite steps in a row: stop before this step is committed
            if saving:  # after the log: a committed step always has its metrics row
                self.ckpt.commit(step, self.state(step))
            self.step = step
            if step < cfg.run.max_steps and self.stop.agreed():  # every rank, at the same step boundary
                if not saving:
                    run.offload.restore()
                    self.ckpt.save(step)
                    self.ckpt.commit(step, self.state(step))
                stopped = True
                break
        run.offload.restore()
        if cfg.checkpoint.export_hf and not stopped:
            export_hf(run.policy, run.hf_config, cfg.model, cfg.engine.weight_bucket_mb, self.out / "hf")
        self.log.close()
        if run.is_rank0:
            plot_run(self.out)
        return self.outcome(stopped)

    def outcome(self, stopped: bool) -> dict[str, Any]:
        return {"out": str(self.out), "steps": self.step, "stopped": stopped}

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint carries besides model, optimizer, scheduler and RNG states (JSON)."""
        return {"step": step, **self.guard.state_dict()}

    def close(self) -> None:
        self.stop.close()
        self.run.close()

    def sync_weights(self) -> None:
        """Training state out of device memory (as configured), then the weight stream wakes the engine."""
        with self.timed("offload"):
            self.offloaded_bytes = self.run.offload.offload()
        with self.timed("sync"):
            self.run.weights.sync()

    def double_update(self, rollouts: StepRollouts) -> dict[str, float]:
        """Advantages over each prompt's group, then one optimizer step on TrSFT (prefix) + Dr.GRPO
        (continuation) tokens of this DP rank's share, every token weighted by the whole step's denominator."""
        cfg, policy = self.cfg, self.run.policy
        seqs = batching.sequences(rollouts.share, cfg.loss, cfg.rollout.max_response_tokens, rollouts.totals.counts,
                                  rollouts.lengths)
        sums = policy.train_step(batching.micro_batches(seqs, cfg.run.max_tokens_per_micro_batch), cfg.loss)
        sums["num_tokens"] = rollouts.totals.num_tokens  # over the global batch
        return sums

    def eval_due(self, step: int) -> bool:
        every = self.cfg.evaluation.every
        due = step == self.cfg.run.max_steps or (every > 0 and step % every == 0)
        return self.cfg.evaluation.path is not None and due


def train(cfg: TrapoConfig, resume: bool = False) -> dict:
    """Run ``cfg`` on this rank to the end; returns a summary (run dir, steps)."""
    from trapo_megatron.train.watchdog import watch_parent

    watch_parent()  # a rank whose launcher died exits instead of running on
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()
