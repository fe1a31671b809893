"""The TRAPO loop, as the paper tells it:

    sample prompts -> roll out in micro-group waves (reward after each wave decides the next guidance)
    -> advantages -> double update (TrSFT on expert prefixes, Dr.GRPO on continuations) -> sync weights
    -> log -> save

Megatron lives behind ``MegatronPolicy``; the engine behind the rollout protocol. Each phase is timed by name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from trapo_megatron.algo.advantages import reward_stats
from trapo_megatron.algo.loss import finalize_metrics
from trapo_megatron.config import to_dict
from trapo_megatron.plot import plot_run
from trapo_megatron.rollout.waves import Rollout
from trapo_megatron.train import batch as batching
from trapo_megatron.train.checkpointing import Checkpointer
from trapo_megatron.train.config import TrapoConfig
from trapo_megatron.train.loggers import build_sinks
from trapo_megatron.train.metrics import MetricsLogger
from trapo_megatron.train.setup import RunContext, build_context


class Trainer:
    def __init__(self, cfg: TrapoConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.ctx: RunContext = build_context(cfg)
        self.out = Path(cfg.run.output_dir)
        self.ckpt = Checkpointer(self.out / "checkpoints", self.ctx)
        self.step = self.ckpt.resume() if (resume or cfg.checkpoint.resume) else 0
        self.log = MetricsLogger(self.out, enabled=self.ctx.is_rank0, total_steps=cfg.run.max_steps,
                                 start_step=self.step, progress=cfg.run.progress,
                                 sinks=lambda: build_sinks(cfg.logging, self.out, to_dict(cfg)))
        self.times: dict[str, float] = {}

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        ctx.sync_weights()  # the engine starts from the checkpoint the policy was (re)loaded from
        first = ctx.evaluate() if self.step == 0 else None
        if first is not None:
            self.log.log(0, {"heldout_accuracy": first})
        for step in range(self.step + 1, cfg.run.max_steps + 1):
            self.times = {}
            examples = ctx.prompts_for_step(step)
            with self.timed("rollout"):
                groups, waves = ctx.roll_out(examples, step)
            with self.timed("train"):
                sums = self.double_update(groups)
            with self.timed("sync"):
                ctx.sync_weights()
            metrics = self.step_metrics(groups, waves, sums)
            if self.eval_due(step):
                with self.timed("eval"):
                    metrics["heldout_accuracy"] = ctx.evaluate()
            metrics.update({f"time_{k}": v for k, v in self.times.items()})
            if step % cfg.run.log_every == 0 or step == cfg.run.max_steps:
                self.log.log(step, metrics)
            if self.ckpt.due(step, cfg.checkpoint.save_every, cfg.run.max_steps):
                self.ckpt.save(step)
            self.step = step
        if cfg.checkpoint.export_hf:
            ctx.export_hf(self.out / "hf")
        self.log.close()
        if ctx.is_rank0:
            plot_run(self.out)
        return {"out": str(self.out), "steps": self.step}

    def double_update(self, groups: list[list[Rollout]]) -> dict[str, float]:
        """Advantages over each prompt's group, then one optimizer step on TrSFT (prefix) + Dr.GRPO
        (continuation) tokens, every token weighted by the global aggregation denominator."""
        cfg = self.cfg
        advantages = batching.advantages_of(groups, cfg.loss).tolist()
        flat = [r for g in groups for r in g]
        seqs = [batching.to_sequence(r, a) for r, a in zip(flat, advantages)]
        batching.weigh(seqs, cfg.loss, cfg.rollout.max_response_tokens, self.ctx.sum_over_dp)
        mbs = batching.micro_batches(seqs, cfg.run.max_tokens_per_micro_batch)
        sums = self.ctx.policy.train_step(mbs, cfg.loss)
        sums["num_tokens"] = self.ctx.sum_over_dp(torch.tensor(float(sum(len(s.tokens) for s in seqs)))).item()
        return sums

    # ------------------------------------------------------------------------------------ metrics
    def step_metrics(self, groups: list[list[Rollout]], waves: Any, sums: dict[str, float]) -> dict[str, Any]:
        """Rewards and lengths over UNGUIDED samples (the paper's report), guidance rate per micro-group
        (fraction of prompts guided), loss statistics (means over their own token counts), throughput."""
        flat = [r for g in groups for r in g]
        stats = reward_stats(torch.tensor([r.reward for r in flat]), torch.tensor([r.guided for r in flat]),
                             torch.tensor([float(len(r.response_ids)) for r in flat]))
        local = torch.tensor([float(stats["reward_sum"]), float(stats["num_unguided"]),
                              float(stats["response_len_sum"]), float(len(flat)), float(len(groups)),
                              *map(float, waves.guided_prompts)])
        (reward_sum, unguided, len_sum, samples, prompts, *guided) = self.ctx.sum_over_dp(local).tolist()
        loss = {k: float(v) for k, v in finalize_metrics({k: torch.tensor(v) for k, v in sums.items()}).items()}
        out: dict[str, Any] = {
            "reward_unguided": reward_sum / max(unguided, 1.0),  # mean over unguided samples
            "response_len_unguided": len_sum / max(unguided, 1.0),  # mean over unguided samples
            "guided_fraction": 1.0 - unguided / max(samples, 1.0),  # fraction of samples with a prefix
            **{f"guided_mg{i + 1}": n / max(prompts, 1.0) for i, n in enumerate(guided)},  # fraction of prompts
            "tokens_per_s": sums["num_tokens"] / max(sum(self.times.values()), 1e-9),  # trained tokens / step time
            "engine_calls": waves.num_engine_calls,
            "time_generate": waves.generate_seconds,  # inside time_rollout
            "time_reward": waves.score_seconds,  # inside time_rollout
        }
        keep = ("loss", "grad_norm", "lr", "sft_tokens", "rl_tokens", "prefix_p_mean", "prefix_outside_trust_region",
                "entropy_mean", "clip_fraction", "logprob_gap_mean", "tis_truncated_fraction", "update_skipped")
        out.update({k: loss[k] for k in keep if k in loss})
        return out

    def eval_due(self, step: int) -> bool:
        every = self.cfg.evaluation.every
        due = step == self.cfg.run.max_steps or (every > 0 and step % every == 0)
        return self.cfg.evaluation.path is not None and due
