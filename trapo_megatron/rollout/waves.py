"""Micro-group waves: a batch of prompts -> per prompt a scored group of G samples.

Wave i runs micro-group i for EVERY prompt of the batch in ONE engine call, then grades the wave, then
decides micro-group i+1 per prompt from the rewards so far. So a training step costs one weight sync and
at most one generate call per micro-group, whatever the batch size (the official code re-syncs weights
before each of its 4 calls). A guided micro-group at L = 1.0 is not generated: its samples are the expert
trace + EOS. Prompts of one wave share no state, so guided and unguided requests mix in the same call.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trapo_megatron.algo.micro_groups import MicroGroupConfig, MicroGroupDecision, decide
from trapo_megatron.data.dataset import Example
from trapo_megatron.data.prefix import cut_prefix, paragraph_token_ids
from trapo_megatron.rollout.engine import RolloutEngine, SamplingParams

_SEED_MIX = 1_000_003


class Scorer(Protocol):
    """Anything that grades full responses against gold answers (``MathRewardPool`` in training)."""

    def score(self, responses: list[str], golds: list[str]) -> list[float]: ...


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling for the rollouts of a training step."""

    temperature: float = 1.0
    """Sampling temperature (paper: 1.0; the trainer's log-probs use the same, see loss.temperature)."""
    top_p: float = 1.0
    """Nucleus sampling cut (1.0: off)."""
    top_k: int = 0
    """0 = no top-k."""
    max_response_tokens: int = 8192
    """Budget of prefix + continuation (the official response_length); a guided request gets the rest, and a
    longer expert prefix is cut to it (set data.max_solution_tokens below it to keep every trace whole)."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop tokens besides the tokenizer's EOS (e.g. <|im_end|> for chat models)."""
    seed: int = 0
    """Base seed; request seeds mix it with the step, the example index and the sample index."""
    reward_special_tokens: bool = False
    """Decode responses for the reward with special tokens kept (the EOS text stays at the end); the official
    code does (verl/trapo_src/main_mix_ppo.py:103, tokenizer.decode without skip_special_tokens)."""

    def __post_init__(self) -> None:
        if self.max_response_tokens < 1:
            raise ValueError(f"rollout.max_response_tokens must be >= 1, got {self.max_response_tokens}")


@dataclass
class Rollout:
    """One sample of a prompt's group. The trainer turns it into tokens and masks:

        tokens        = prompt_ids + prefix_ids + continuation_ids
        SFT (TrSFT)   on prefix_ids        iff sft_on_prefix
        RL (Dr.GRPO)  on continuation_ids  with old log-probs continuation_logprobs, advantage from reward

    Worked example (paper mode, MG2 guided at L=0.2 of a 10-token solution [31..40], MG size 2):
        Rollout(example_index=17, sample_index=4, micro_group=1, guided=True, ratio=0.2,
                prompt_ids=[1, 5, 9], prefix_ids=[31, 32], continuation_ids=[77, 78, 2],
                continuation_logprobs=[-0.3, -1.2, -0.01], sft_on_prefix=False, reward=0.0,
                finish_reason="stop", second_solution=False)
        Rollout(example_index=17, sample_index=5, ..., prefix_ids=[31, 32], continuation_ids=[50, 2],
                continuation_logprobs=[-0.7, -0.2], sft_on_prefix=True, reward=1.0, ...)
    The two share one prefix; only sample 5 carries SFT loss on it. A full-expert sample (L=1.0):
        prefix_ids = solution + [eos], continuation_ids = [], continuation_logprobs = [],
        finish_reason = "expert", sft_on_prefix = True.
    An unguided sample has prefix_ids = [] and ratio = 0.0. The reward grades prefix + continuation.
    """

    example_index: int
    """Example.index (the dataset row)."""
    sample_index: int
    """0..G-1 within the group, in micro-group order."""
    micro_group: int
    """0-based micro-group."""
    guided: bool
    ratio: float
    """Prefix ratio L used (0.0 when unguided)."""
    prompt_ids: list[int]
    prefix_ids: list[int]
    continuation_ids: list[int] = field(default_factory=list)
    continuation_logprobs: list[float] = field(default_factory=list)
    """Engine log-probs of continuation_ids (the distribution sampled from)."""
    sft_on_prefix: bool = False
    reward: float = 0.0
    finish_reason: str = "expert"
    """"stop" | "length" (engine), "expert" (full expert trace, not generated), "budget" (no room left)."""
    second_solution: bool = False
    """The prefix comes from the row's second expert solution."""

    @property
    def response_ids(self) -> list[int]:
        return self.prefix_ids + self.continuation_ids


@dataclass
class WaveStats:
    """What the waves of one step did (counts over the batch)."""

    num_engine_calls: int = 0
    """Generate calls: at most one per micro-group."""
    num_generated: int = 0
    """Requests sent to the engine."""
    num_expert_only: int = 0
    """Full-expert samples (L=1.0), built without generation."""
    guided_prompts: list[int] = field(default_factory=list)
    """Per micro-group, the number of prompts it guided."""
    generate_seconds: float = 0.0
    score_seconds: float = 0.0


def request_seed(base: int, step: int, position: int, example_index: int, sample_index: int) -> int:
    """A per-request seed, the same on every rank of a model-parallel group, distinct per (step, position in
    the batch, row, sample): a row drawn twice in one step still gets two independent groups."""
    s = base
    for x in (step, position, example_index, sample_index):
        s = (s * _SEED_MIX + x) % (2**31 - 1)
    return s


class _Wave:
    """The samples of one micro-group over the batch, and the engine requests among them."""

    def __init__(self) -> None:
        self.samples: list[Rollout] = []
        self.requests: list[tuple[Rollout, list[int], SamplingParams]] = []
        self.num_expert = 0


def _plan_samples(
    ex: Example,
    d: MicroGroupDecision,
    offset: int,
    prefix: list[int],
    cfg: RolloutConfig,
    where: tuple[int, int],
    stop_ids: tuple[int, ...],
    wave: _Wave,
) -> None:
    """Append micro-group ``d``'s samples of ``ex`` to the wave; ``where`` = (step, position in the batch)."""
    for j in range(d.size):
        r = Rollout(
            example_index=ex.index,
            sample_index=offset + j,
            micro_group=d.index,
            guided=d.guided,
            ratio=d.ratio,
            prompt_ids=list(ex.prompt_ids),
            prefix_ids=list(prefix),
            sft_on_prefix=d.guided and j == d.sft_sample,
            second_solution=d.use_second_solution,
        )
        wave.samples.append(r)
        budget = cfg.max_response_tokens - len(prefix)
        if d.full_expert:
            wave.num_expert += 1
            continue
        if budget < 1:
            r.finish_reason = "budget"
            continue
        params = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_tokens=budget,
            seed=request_seed(cfg.seed, *where, ex.index, r.sample_index),
            stop_token_ids=stop_ids,
        )
        wave.requests.append((r, r.prompt_ids + r.prefix_ids, params))


def stop_token_ids(tokenizer, cfg: RolloutConfig, model_dir: str | None = None) -> tuple[int, ...]:
    """The tokenizer's EOS, the configured extra stop tokens, then the model's generation-config eos ids,
    each once, EOS first.

    vLLM adds the generation-config ids to every request itself (SamplingParams.update_from_generation_config,
    vllm/v1/engine/input_processor.py; the config comes from GenerationConfig.from_pretrained(model), else
    from the model config, vllm/transformers_utils/config.py try_get_generation_config): passing them here
    makes the CPU twin stop where vLLM does (Instruct models list <|im_end|> there). ``model_dir``: the
    model folder, by default the one the tokenizer was loaded from.
    """
    return tuple(dict.fromkeys((tokenizer.eos_token_id, *cfg.stop_token_ids, *_generation_eos_ids(
        model_dir if model_dir is not None else getattr(tokenizer, "name_or_path", "")))))


@functools.lru_cache(maxsize=8)
def _generation_eos_ids(model_dir: str) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an int or a list), falling back to config.json's, as vLLM
    reads them; () for anything that is not a local model folder (nothing to fetch offline)."""
    if not model_dir or not Path(model_dir, "config.json").is_file():
        return ()
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: vLLM derives one from the model config
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    eos = gen.eos_token_id
    return () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))


def run_waves(
    examples: Sequence[Example],
    *,
    schedule: MicroGroupConfig,
    engine: RolloutEngine,
    scorer: Scorer,
    tokenizer,
    cfg: RolloutConfig,
    step: int = 0,
    positions: Sequence[int] | None = None,
) -> tuple[list[list[Rollout]], WaveStats]:
    """Roll out a batch in micro-group waves; return per example its G samples (in sample order) and stats.

    The engine must be awake with the current policy (the trainer syncs weights once before this call).
    ``positions``: each example's place in the step's whole batch (default: its index here). Request seeds
    depend on it, so a data-parallel shard samples exactly what the whole batch would on one rank.
    ``scorer`` is the hook that keeps the ranks of an engine replica in step: under the rollout service it is
    a ReplicaScorer (grades on the replica's leader, broadcasts), so every rank decides the next
    micro-groups from the same rewards whatever the wall clock did to the reward pool.
    """
    positions = range(len(examples)) if positions is None else positions
    eos = tokenizer.eos_token_id
    stop_ids = stop_token_ids(tokenizer, cfg)
    para = _paragraph_ids(tokenizer) if schedule.snap_window else frozenset()
    groups: list[list[Rollout]] = [[] for _ in examples]
    stats = WaveStats()
    offset = 0
    for mg in range(schedule.num_micro_groups):
        wave = _Wave()
        num_guided = 0
        for p, ex in enumerate(examples):
            d = decide(
                schedule, mg, [r.reward for r in groups[p]], has_second_solution=len(ex.solution_ids) > 1
            )
            num_guided += d.guided
            solution = ex.solution_ids[1 if d.use_second_solution else 0]
            prefix = (
                cut_prefix(solution, d.ratio, schedule, eos_id=eos, paragraph_ids=para) if d.guided else []
            )
            # cut to the budget, as the official code does (data.max_solution_tokens keeps traces whole)
            prefix = prefix[: cfg.max_response_tokens]
            start = len(wave.samples)
            _plan_samples(ex, d, offset, prefix, cfg, (step, positions[p]), stop_ids, wave)
            groups[p].extend(wave.samples[start:])  # rewards arrive after the wave is graded
        stats.guided_prompts.append(num_guided)
        _generate(engine, wave, stats)
        _score(scorer, tokenizer, examples, wave, stats, cfg.reward_special_tokens)
        offset += schedule.sizes[mg]
    return groups, stats


@functools.lru_cache(maxsize=4)
def _paragraph_ids(tokenizer) -> frozenset[int]:
    return paragraph_token_ids(tokenizer)  # a vocabulary scan: once per tokenizer, not once per step


def _generate(engine: RolloutEngine, wave: _Wave, stats: WaveStats) -> None:
    stats.num_expert_only += wave.num_expert
    if not wave.requests:
        return
    t0 = time.perf_counter()
    outs = engine.generate([q for _, q, _ in wave.requests], [p for _, _, p in wave.requests])
    stats.generate_seconds += time.perf_counter() - t0
    stats.num_engine_calls += 1
    stats.num_generated += len(outs)
    for (r, _, _), g in zip(wave.requests, outs, strict=True):
        r.continuation_ids, r.continuation_logprobs, r.finish_reason = (
            g.token_ids,
            g.logprobs,
            g.finish_reason,
        )


def _score(scorer: Scorer, tokenizer, examples: Sequence[Example], wave: _Wave, stats: WaveStats,
           special_tokens: bool) -> None:
    t0 = time.perf_counter()
    texts = [tokenizer.decode(r.response_ids, skip_special_tokens=not special_tokens) for r in wave.samples]
    golds = {ex.index: ex.answer for ex in examples}
    for r, s in zip(
        wave.samples, scorer.score(texts, [golds[r.example_index] for r in wave.samples]), strict=True
    ):
        r.reward = float(s)
    stats.score_seconds += time.perf_counter() - t0
