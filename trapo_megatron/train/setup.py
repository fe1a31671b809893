"""Building a run: the distributed world, data, the Megatron policy and the rollout service, each piece with
one job, wired together for the trainer's loop:

    StepSampler           the data order: step -> the step's prompts (train/sampler.py)
    RolloutService        engine replicas, waves, replica-wide grading, the hand-over (rollout/service.py)
    WeightSync            the per-step weight stream from the policy into the engine
    TrainingStateOffload  grads / optimizer state out of device memory while the engine runs (megatron/offload.py)
    export_hf             the final policy as a Hugging Face checkpoint (train/export.py)
    Run.close             teardown

Every rank builds an engine (vLLM is SPMD over each replica; the CPU twin's non-leader ranks hold a
ReplicaCpuEngine that receives the leader's outputs) and takes part in every call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trapo_megatron.data.dataset import Example, load_for_run
from trapo_megatron.megatron import model_builder, platform
from trapo_megatron.megatron.offload import TrainingStateOffload
from trapo_megatron.megatron.policy import MegatronPolicy
from trapo_megatron.rollout.replicas import ReplicaLayout, new_replica_group
from trapo_megatron.rollout.service import ReplicaScorer, RolloutService
from trapo_megatron.train.config import TrapoConfig, engine_tensor_parallel_size
from trapo_megatron.train.sampler import StepSampler


class WeightSync:
    """One pass of the policy's weight stream into the engine; every rank takes part (TP gathers, PP
    hand-overs), every rank's engine loads (or, off the CPU twin's leader, drains) it."""

    def __init__(self, policy: MegatronPolicy, rollout: RolloutService, bucket_mb: int) -> None:
        self.policy, self.rollout, self.bucket_bytes = policy, rollout, bucket_mb * 2**20

    def sync(self) -> None:
        self.rollout.load_weights(self.policy.hf_weights(self.bucket_bytes))


@dataclass
class Run:
    """The pieces of one run (see the module docstring)."""

    cfg: TrapoConfig
    hf_config: Any
    tokenizer: Any
    policy: MegatronPolicy
    sampler: StepSampler
    rollout: RolloutService
    weights: WeightSync
    offload: TrainingStateOffload
    heldout_examples: list[Example]

    @property
    def is_rank0(self) -> bool:
        return dist.get_rank() == 0

    def evaluate(self) -> float | None:
        """Greedy held-out accuracy (None without an evaluation file)."""
        if not self.heldout_examples:
            return None
        budget = self.cfg.evaluation.max_new_tokens or self.cfg.rollout.max_response_tokens
        return self.rollout.evaluate(self.heldout_examples, budget)

    def close(self, destroy_world: bool = True) -> None:
        """Teardown: reward pool, engine, then (unless ``destroy_world`` is False) Megatron and the world."""
        self.rollout.close()
        if destroy_world:
            platform.destroy()


def _load(cfg: TrapoConfig, data_path: str | None, tokenizer: Any, limit: int | None = None,
          heldout: bool = False) -> list[Example]:
    """Rows -> examples (held-out rows need no expert solution); rank 0 prints the load report and writes it
    to <output_dir>/data_report[_heldout].json."""
    if data_path is None:
        return []
    data_cfg = replace(cfg.data, path=data_path, max_rows=limit if limit is not None else cfg.data.max_rows)
    report = Path(cfg.run.output_dir) / f"data_report{'_heldout' if heldout else ''}.json"
    return load_for_run(data_cfg, cfg.prompt, tokenizer, report if dist.get_rank() == 0 else None, not heldout)


def _make_engine(cfg: TrapoConfig, layout: ReplicaLayout, group: Any) -> Any:
    if cfg.engine.kind == "cpu":
        from trapo_megatron.rollout.cpu_engine import CpuEngine, ReplicaCpuEngine

        if layout.tensor_parallel_size == 1:
            return CpuEngine.from_pretrained(cfg.model.hf_path)
        leader = CpuEngine.from_pretrained(cfg.model.hf_path) if layout.is_leader else None
        return ReplicaCpuEngine(leader, layout, group)
    from trapo_megatron.rollout.vllm_engine import VllmEngine

    max_len = cfg.engine.vllm_max_model_len or cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    return VllmEngine(cfg.model.hf_path, tensor_parallel_size=layout.tensor_parallel_size,
                      seed=cfg.run.seed, gpu_memory_utilization=cfg.engine.vllm_gpu_memory_utilization,
                      max_model_len=max_len, enforce_eager=cfg.engine.vllm_enforce_eager,
                      engine_kwargs=cfg.engine.vllm_kwargs)


def check_layout(cfg: TrapoConfig, hf_config: Any, world_size: int) -> None:
    """Fail before anything is built when TP/PP or the engine replicas cannot split this model on this world."""
    dp = cfg.parallel.data_parallel_size(world_size)
    model_builder.validate_hf_config(hf_config, cfg.parallel)
    ReplicaLayout(world_size=world_size, tensor_parallel_size=engine_tensor_parallel_size(cfg), rank=0)
    if cfg.run.prompts_per_step % dp:
        raise ValueError(f"run.prompts_per_step={cfg.run.prompts_per_step} is not divisible by the data-parallel "
                         f"size {dp}")


def check_config(cfg: TrapoConfig, world_size: int) -> None:
    """Everything that can be checked before a process group exists: the checkpoint is there and the
    TP/PP layout splits this model on ``world_size`` ranks (ValueError naming the knob otherwise)."""
    from transformers import AutoConfig

    if not (Path(cfg.model.hf_path) / "config.json").is_file():
        raise ValueError(f"model.hf_path={cfg.model.hf_path!r} is not a Hugging Face checkpoint directory "
                         "(no config.json)")
    check_layout(cfg, AutoConfig.from_pretrained(cfg.model.hf_path), world_size)


def build_run(cfg: TrapoConfig) -> Run:
    from transformers import AutoConfig, AutoTokenizer

    from trapo_megatron.reward.math_reward import MathRewardPool

    hf_path = cfg.model.hf_path
    hf_config = AutoConfig.from_pretrained(hf_path)
    platform.initialize(cfg.parallel, seed=cfg.run.seed, timeout_minutes=cfg.run.collective_timeout_minutes)
    check_layout(cfg, hf_config, dist.get_world_size())
    tokenizer = AutoTokenizer.from_pretrained(hf_path)
    train = _load(cfg, cfg.data.path, tokenizer)
    heldout = _load(cfg, cfg.evaluation.path, tokenizer, cfg.evaluation.max_problems, heldout=True)
    policy = MegatronPolicy(hf_config, hf_path, cfg.model, cfg.parallel, cfg.optimizer, cfg.run.max_steps)
    layout = ReplicaLayout(world_size=dist.get_world_size(), tensor_parallel_size=engine_tensor_parallel_size(cfg),
                           rank=dist.get_rank())
    group = new_replica_group(layout)
    engine = _make_engine(cfg, layout, group)
    scorer = ReplicaScorer(MathRewardPool(cfg.reward) if layout.is_leader else None, layout, group)
    rollout = RolloutService(engine, scorer, layout, platform.host_group(), tokenizer=tokenizer, rollout=cfg.rollout,
                             schedule=cfg.micro_groups, dp_rank=policy.dp_rank, dp_size=policy.dp_size)
    return Run(cfg=cfg, hf_config=hf_config, tokenizer=tokenizer, policy=policy,
               sampler=StepSampler(train, cfg.run.prompts_per_step, cfg.run.seed if cfg.data.order_seed is None
                                   else cfg.data.order_seed, cfg.data.order), rollout=rollout,
               weights=WeightSync(policy, rollout, cfg.engine.weight_bucket_mb),
               offload=TrainingStateOffload(cfg.engine.offload_during_rollout, policy.chunks, policy.optimizer),
               heldout_examples=heldout)
