"""The rollout engine protocol: what the trainer needs from a generator, and nothing more.

Two engines implement it: ``CpuEngine`` (Hugging Face transformers, the CPU twin used by tests and the demo)
and ``VllmEngine`` (colocated vLLM: on GPU, or on vLLM's CPU build, which runs it for real in tests/vllm_cpu).
Everything is token ids: the engine never sees text.

Lifecycle, per training step (the trainer holds the GPU in between):

    engine = VllmEngine(hf_config_dir, ...)      # built once, awake, weights random ("dummy")
    engine.load_weights(stream)                   # step 0: push the policy (wakes what it needs)
    outs = engine.generate(prompts, params)       # one call per micro-group wave
    engine.sleep()                                # free memory for the training step (weights discarded)
    ... train ...
    engine.load_weights(stream)                   # wake weights, reload in place, wake KV cache, reset prefix cache
    ...
    engine.close()

- ``load_weights`` leaves the engine awake and ready to generate; stale prefix-cache entries are dropped.
- ``sleep`` discards the weights (vLLM sleep level 2: the refit overwrites them anyway, so nothing is copied
  to host and back; a platform without sleep mode, vLLM's CPU build, keeps them); the only way back is
  ``load_weights``. ``wake_up`` on an awake engine does nothing and
  on a sleeping one raises: a wake without a refit would generate from discarded memory.
- ``sleep`` is idempotent; ``generate`` on a sleeping engine raises.
- ``close`` is idempotent and releases everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling for one request. The seed makes a request reproducible on its own (not batch dependent).

    Example: SamplingParams(temperature=1.0, max_tokens=64, seed=1234, stop_token_ids=(151643,))
    temperature 0 means greedy; top_k 0 means no top-k; top_p 1.0 means no nucleus cut.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 1024
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Generation stops after emitting one of these (the stop token is part of token_ids)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_tokens < 1:
            raise ValueError(
                f"sampling top_k must be >= 0 and max_tokens >= 1, got {self.top_k}, {self.max_tokens}"
            )


@dataclass(frozen=True)
class Generation:
    """What one request produced.

    Example (prompt [5, 9], the model sampled 17 then the stop token 2):
        Generation(token_ids=[17, 2], logprobs=[-1.73, -0.05], finish_reason="stop")
    ``logprobs[i]`` is log p(token_ids[i] | prompt, token_ids[:i]) under the distribution the token was
    sampled from (logits / temperature, after top-k / top-p). At temperature 1, top_p 1, top_k 0 (the
    paper's setting) this is the model's raw log-prob, which the trainer recomputes. Greedy: raw log-probs.
    finish_reason: "stop" (a stop token was emitted, it is the last of token_ids) or "length" (max_tokens).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def check_generate_args(
    sleeping: bool, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
) -> None:
    """The preconditions every engine's generate() enforces."""
    if sleeping:
        raise RuntimeError("generate() on a sleeping engine: call wake_up() or load_weights() first")
    if len(prompts) != len(params):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(params)} sampling params")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt")


def check_wake_up(sleeping: bool) -> None:
    """``wake_up`` is a check, not a way back: sleep discarded the weights (lifecycle in the module docstring)."""
    if sleeping:
        raise RuntimeError("wake_up() on a sleeping engine: sleep() discarded the weights; refit with "
                           "load_weights(stream), which wakes the engine")


WeightStream = Iterable[tuple[str, torch.Tensor]]
"""(Hugging Face name, full unsharded tensor), e.g. ("model.layers.0.self_attn.q_proj.weight", W)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator the trainer can refit, query and put to sleep (lifecycle: the module docstring)."""

    def load_weights(self, weights: WeightStream) -> None:
        """Copy every weight in (HF names, full tensors); wake as needed; drop stale prefix-cache entries."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        """One Generation per prompt, in input order; ``params[i]`` applies to ``prompts[i]``."""

    def sleep(self) -> None:
        """Free the engine's accelerator memory (weights and KV cache discarded) while training runs."""

    def wake_up(self) -> None:
        """Nothing when awake; RuntimeError when asleep (the weights are gone: refit with load_weights)."""

    @property
    def is_sleeping(self) -> bool:
        """True between sleep() and the next wake_up() / load_weights()."""

    def close(self) -> None:
        """Release everything; idempotent."""
