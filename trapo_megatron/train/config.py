"""The whole run's configuration: one section per component, each owned by the component's own module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trapo_megatron.algo.loss import LossConfig
from trapo_megatron.algo.micro_groups import MicroGroupConfig
from trapo_megatron.config import load
from trapo_megatron.data.dataset import DataConfig
from trapo_megatron.data.prompts import PromptConfig
from trapo_megatron.megatron.model_builder import ModelConfig
from trapo_megatron.megatron.platform import ParallelConfig
from trapo_megatron.megatron.step import OptimizerConfig
from trapo_megatron.offload_modes import OffloadMode
from trapo_megatron.reward.math_reward import RewardConfig
from trapo_megatron.rollout.waves import RolloutConfig
from trapo_megatron.train import stopping
from trapo_megatron.train.loggers import LoggingConfig


@dataclass(kw_only=True)
class RunConfig:
    """The loop: how long, how big, where to write."""

    output_dir: str = "runs/trapo"
    """Run directory: metrics.jsonl, TensorBoard events, curves.png, checkpoints/, hf/ (final export)."""
    seed: int = 1234
    """Seeds the data order, the sampling seeds and Megatron's RNG tracker. A (seed, step) pair fixes a step."""
    max_steps: int = 100
    """Optimizer steps (one per batch of prompts)."""
    prompts_per_step: int = 128
    """Prompts per optimizer step over all data-parallel ranks (paper: 128; official script: 8)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one packed micro-batch (sequences are packed without padding)."""
    log_every: int = 1
    """Write metrics every N steps."""
    progress: bool = True
    """Show a progress bar with the key numbers on rank 0."""
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    """Signals that stop the run gracefully: every rank finishes the current step, saves a checkpoint and the
    process exits with status 75 (resume it with checkpoint.resume / --resume)."""
    collective_timeout_minutes: int = 30
    """A collective that waits longer than this (a peer died or hangs) fails the rank instead of blocking it."""
    max_consecutive_skips: int = 3
    """Stop the run (exit status 3) after this many optimizer steps in a row were skipped for a non-finite
    loss or gradient norm; 0: never stop. A skipped step leaves weights, optimizer and LR schedule as they
    were; its prompts are consumed (the data position advances)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "prompts_per_step", "max_tokens_per_micro_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.collective_timeout_minutes < 1:
            raise ValueError(f"run.collective_timeout_minutes must be >= 1, got {self.collective_timeout_minutes}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"run.max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")
        stopping.parse_signals(self.stop_signals)


@dataclass(kw_only=True)
class EngineConfig:
    """Which rollout engine runs the waves and how the weights reach it."""

    kind: Literal["cpu", "vllm"] = "vllm"
    """"vllm": colocated vLLM on the training GPUs (asleep while training); "cpu": the transformers twin
    (tests, the demo). Both run as engine replicas over the whole world (rollout/service.py)."""
    tensor_parallel_size: int | None = None
    """Ranks per engine replica (contiguous blocks of the world, like vLLM's TP groups); the step's prompts are
    split over all world / tensor_parallel_size replicas. None: parallel.tensor_model_parallel_size. Any
    divisor of the world works: the weight stream carries full HF tensors whatever the training TP."""
    offload_during_rollout: OffloadMode = "none"
    """Training state moved to host memory (pinned on GPU) before the engine wakes for the weight sync and
    rollouts, and back before the update: "grads" (DDP main-grad buffers) or "grads+optimizer" (also Adam
    state and fp32 master copies). Bit-identical round trip; timed as time_offload / time_restore."""
    weight_bucket_mb: int = 512
    """Size of one bucket of the per-step weight stream into the engine."""
    vllm_gpu_memory_utilization: float = 0.4
    """vLLM: fraction of GPU memory for its weights + KV cache."""
    vllm_max_model_len: int | None = None
    """vLLM: longest prompt + response; None: data.max_prompt_tokens + rollout.max_response_tokens."""
    vllm_enforce_eager: bool = False
    """vLLM: disable CUDA graphs (slower, less memory, faster start)."""
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    """vLLM: further ``vllm.LLM`` arguments, applied last, each an EngineArgs field (checked when the engine is
    built), e.g. engine.vllm_kwargs.max_num_seqs=64, .kv_cache_memory_bytes=268435456, .quantization=fp8,
    .dtype=bfloat16. Sleep mode, dtype and (on CPU) the KV cache size default from the platform."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError(f"engine.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.weight_bucket_mb < 1:
            raise ValueError(f"engine.weight_bucket_mb must be >= 1, got {self.weight_bucket_mb}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ValueError("engine.vllm_gpu_memory_utilization must lie in (0, 1)")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Megatron distributed checkpoints (model + optimizer + trainer state) and the final HF export."""

    save_every: int = 50
    """Save every N steps (and always at the last step); 0: only at the end."""
    resume: bool = False
    """Resume from <output_dir>/checkpoints/latest if it exists (also `trapo train --resume`)."""
    export_hf: bool = True
    """Write the final policy as a Hugging Face checkpoint to <output_dir>/hf."""

    def __post_init__(self) -> None:
        if self.save_every < 0:
            raise ValueError(f"checkpoint.save_every must be >= 0, got {self.save_every}")


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation during the run: greedy, unguided, graded like training rewards."""

    path: str | None = None
    """Local jsonl/parquet file with the same columns as the training data; None: no evaluation."""
    every: int = 0
    """Evaluate every N steps (and before the first and after the last); 0: only before and after."""
    max_problems: int = 256
    """Evaluate on at most this many rows."""
    max_new_tokens: int | None = None
    """Longest greedy answer; None: rollout.max_response_tokens."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.max_problems < 1:
            raise ValueError("evaluation.every must be >= 0 and evaluation.max_problems >= 1")


@dataclass(kw_only=True)
class TrapoConfig:
    """A TRAPO run. Every section is documented where its dataclass is defined."""

    run: RunConfig = field(default_factory=RunConfig)
    """The loop."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's starting checkpoint and dtype."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP x PP (DP is the rest of the world)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam, LR schedule, gradient clipping."""
    loss: LossConfig = field(default_factory=LossConfig)
    """TrSFT / SFT / LUFFY / none on expert prefixes, Dr.GRPO on continuations, aggregation, advantages."""
    micro_groups: MicroGroupConfig = field(default_factory=MicroGroupConfig)
    """The adaptive expert-prefix schedule."""
    data: DataConfig
    """Training rows and their validation."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """How a problem becomes a prompt."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of the rollouts (temperature, response budget, stop tokens)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The generation engine and the weight stream into it."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """math-verify grading."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation during the run."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Experiment loggers beside metrics.jsonl (TensorBoard, Weights & Biases)."""

    def __post_init__(self) -> None:
        if not self.model.hf_path:
            raise ValueError("model.hf_path is required: the Hugging Face checkpoint the policy starts from")
        if self.loss.temperature != self.rollout.temperature:
            raise ValueError(f"loss.temperature={self.loss.temperature} must equal rollout.temperature="
                             f"{self.rollout.temperature}: the trained log-probs are of the sampled distribution")


def engine_tensor_parallel_size(cfg: TrapoConfig) -> int:
    """The engine's TP: engine.tensor_parallel_size, the trainer's TP when unset (also read by `trapo launch`)."""
    return cfg.engine.tensor_parallel_size or cfg.parallel.tensor_model_parallel_size


def load_config(paths: str | list[str], overrides: list[str]) -> TrapoConfig:
    """The run's configuration from YAML files (layered in order) plus dotted overrides; ConfigError names the key."""
    return load(TrapoConfig, paths, overrides)
