"""The full TRAPO loss of one packed micro-batch: prefix-token objective (TrSFT) + Dr.GRPO on continuations.

    loss = sum_t token_weight[t] * ( sft_mask[t] * prefix_objective(logp[t])
                                   + rl_mask[t]  * pg_loss[t] )
         - sum_t entropy_weight[t] * entropy_coef * H[t]

(entropy_weight = token_weight on the loss tokens by default; the official mode's is in
official_micro_batches.py)

``token_weight`` carries the global denominator (``aggregation.token_weights``), so summing this over
micro-batches and ranks gives the global loss and the gradient is independent of the split. The train step
calls :func:`trapo_loss` on the logits of its micro-batch; metrics come back as SUMS to be all-reduced and
then turned into means by :func:`finalize_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict, get_args

import torch
import torch.distributed as dist

from trapo_megatron.algo.advantages import ADVANTAGES
from trapo_megatron.algo.aggregation import AGGREGATIONS, AggregationMode
from trapo_megatron.algo.objectives import PREFIX_OBJECTIVES, PrefixObjective
from trapo_megatron.algo.policy_gradient import entropy_bonus, policy_gradient_loss, tis_weights
from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs_entropy


@dataclass(kw_only=True)
class LossConfig:
    """The TRAPO objective. Defaults are the paper's (arXiv 2512.17636)."""

    prefix_objective: PrefixObjective = "trsft"
    """Loss on expert-prefix tokens: "trsft" (TRAPO), "sft" (naive ablation), "luffy" (p/(p+gamma)),
    "none" (pure RL on continuations)."""
    trsft_alpha: float = 0.1
    """TrSFT trust-region threshold alpha in (0, 1]: expert tokens with p < alpha get gradient weight 1/alpha
    instead of 1/p."""
    luffy_gamma: float = 0.1
    """LUFFY shaping constant gamma > 0 in p/(p+gamma)."""
    continuation_objective: Literal["grpo", "none"] = "grpo"
    """Loss on continuation tokens (the policy's own): "grpo" (Dr.GRPO policy gradient), "none" (no RL: with
    prefix_objective="sft" and an always-guided L=1.0 schedule this is the SFT-only ablation)."""
    clip_ratio_low: float | None = 0.2
    """PPO clip epsilon below (ratio >= 1 - clip_ratio_low); None: no lower clip. No effect on a single
    on-policy update (ratio = 1)."""
    clip_ratio_high: float | None = 0.2
    """PPO clip epsilon above (ratio <= 1 + clip_ratio_high); None: no upper clip."""
    tis_cap: float | None = None
    """Truncated importance sampling cap C: continuation losses are weighted by min(pi_old/pi_rollout, C),
    correcting the train/inference mismatch. Needs rollout_logprobs in the batch. None: off."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient; the official code: 0.001 (exp_scripts/train_trapo.sh:52)."""
    entropy_mode: Literal["loss_tokens", "official"] = "loss_tokens"
    """Which tokens carry the entropy bonus and how it is weighed: "loss_tokens" the SFT and RL tokens with the
    aggregation weights of the loss; "official" every response token (prefix without SFT included) with the
    official per-micro-batch token mean, averaged over reference_world_size ranks, the micro-batches rebuilt
    from the lengths (official_micro_batches.py; verl/trapo_src/mix_actor.py:211,235)."""
    entropy_micro_batch_tokens: int = 32768
    """Token budget of an official micro-batch, read by entropy_mode="official" (ppo_max_token_len_per_gpu,
    exp_scripts/train_trapo.sh:33-34)."""
    aggregation: AggregationMode = "drgrpo"
    """How per-token losses are summed (read by the trainer when it builds token_weight, see aggregation.py):
    "drgrpo" 1/(max_response_len * num_seqs), "token_mean" 1/num_tokens, "seq_mean" 1/(len_i * num_seqs),
    "fsdp_sum" 1/(max_response_len * reference_world_size) (the official actor: verl/trapo_src/
    mix_core_alg.py:290-291, FSDP's mean over ranks)."""
    reference_world_size: int = 8
    """Data-parallel size of the run being reproduced, read by aggregation="fsdp_sum" and
    entropy_mode="official" (the official script: 8 GPUs, exp_scripts/train_trapo.sh:58)."""
    advantage: Literal["drgrpo", "grpo"] = "drgrpo"
    """Advantage estimator (read by the trainer, see advantages.py): "drgrpo" r - group mean; "grpo" also
    divides by the group std."""
    advantage_eps: float = 1e-6
    """eps in (r - mean) / (std + eps) for advantage="grpo"."""
    temperature: float = 1.0
    """Sampling temperature; logits are divided by it before the softmax, as the rollout engine does."""
    chunk_tokens: int | None = None
    """Tokens per chunk in the vocab-parallel kernels; None: a per-device budget (vocab_parallel.py)."""
    fused_output_layer: bool = True
    """Compute log-probs and entropy from the final hidden states chunk by chunk, fusing Megatron's output
    layer into the kernels so the [T, V/TP] logits and their gradient never exist (megatron/fused_output.py;
    the same losses and gradients); False: the output layer writes the logits, the kernels read them."""
    fused_output_grads: Literal["auto", "forward", "recompute"] = "auto"
    """With fused_output_layer, when the gradients are computed (megatron/fused_output.py): "forward" (the loss
    is a sum of per-token terms with weights fixed before the step, so each token chunk's gradient is known in
    forward: three output-layer GEMMs like the unfused path, the weight gradient summed over the chunks in
    fp32, into Megatron DDP's main_grad); "recompute" (only per-token statistics kept, backward recomputes the
    logits: one GEMM more); "auto": "forward" wherever that fp32 sum has a home (the trainer's weights always
    have main_grad), "recompute" for a 16-bit weight without one (megatron/chunking.py grads_mode). Measured
    on the CPU at Qwen2.5-7B TP2 shapes in bf16: forward 0.195x the logits' memory and 1.09x the unfused
    time, recompute 0.69x and 1.9x."""

    def __post_init__(self) -> None:
        for name, table in (
            ("prefix_objective", PREFIX_OBJECTIVES),
            ("aggregation", AGGREGATIONS),
            ("advantage", ADVANTAGES),
        ):
            if getattr(self, name) not in table:
                raise ValueError(
                    f"LossConfig.{name} must be one of {sorted(table)}, got {getattr(self, name)!r}"
                )
        if not 0.0 < self.trsft_alpha <= 1.0:
            raise ValueError(f"LossConfig.trsft_alpha must be in (0, 1], got {self.trsft_alpha}")
        for name in ("luffy_gamma", "temperature", "advantage_eps"):
            if not (getattr(self, name) > 0.0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"LossConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.clip_ratio_low is not None and not 0.0 <= self.clip_ratio_low < 1.0:
            raise ValueError(
                f"LossConfig.clip_ratio_low must be in [0, 1) or None, got {self.clip_ratio_low}"
            )
        if self.clip_ratio_high is not None and not self.clip_ratio_high >= 0.0:
            raise ValueError(f"LossConfig.clip_ratio_high must be >= 0 or None, got {self.clip_ratio_high}")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"LossConfig.tis_cap must be > 0 or None, got {self.tis_cap}")
        if not (self.entropy_coef >= 0.0 and math.isfinite(self.entropy_coef)):
            raise ValueError(f"LossConfig.entropy_coef must be a finite number >= 0, got {self.entropy_coef}")
        if self.entropy_mode not in ("loss_tokens", "official"):
            raise ValueError(f"LossConfig.entropy_mode must be 'loss_tokens' or 'official', got {self.entropy_mode!r}")
        if self.fused_output_grads not in ("auto", "forward", "recompute"):
            raise ValueError("LossConfig.fused_output_grads must be 'auto', 'forward' or 'recompute', got "
                             f"{self.fused_output_grads!r}")
        if self.entropy_micro_batch_tokens < 1:
            raise ValueError(
                f"LossConfig.entropy_micro_batch_tokens must be >= 1, got {self.entropy_micro_batch_tokens}"
            )
        if self.reference_world_size < 1:
            raise ValueError(f"LossConfig.reference_world_size must be >= 1, got {self.reference_world_size}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"LossConfig.chunk_tokens must be >= 1 or None, got {self.chunk_tokens}")


assert set(get_args(PrefixObjective)) == set(PREFIX_OBJECTIVES)
assert set(get_args(AggregationMode)) == set(AGGREGATIONS)


class TokenBatch(TypedDict):
    """Per-token inputs of one packed micro-batch of T tokens (all ``[T]``, on the logits' device).

    Worked example: two samples packed, padded to T = 10. Sample A: prompt 2, expert prefix 2 (carries SFT),
    continuation 2, advantage +0.5. Sample B: prompt 2, continuation 1, advantage -0.5. Dr.GRPO weights with
    max_response_len 4 and 2 sequences in the global batch: 1/8 on each loss token.

        tokens        a0  a1  e0  e1  c0  c1 | b0  b1  d0 | PAD
        labels        a1  e0  e1  c0  c1 -100| b1  d0 -100| -100   (shifted within each sample)
        sft_mask       0   1   1   0   0   0 |  0   0   0 |  0
        rl_mask        0   0   0   1   1   0 |  0   1   0 |  0
        advantages    .5  .5  .5  .5  .5  .5 | -.5 -.5 -.5|  0
        token_weight   0 1/8 1/8 1/8 1/8   0 |  0  1/8  0 |  0

    ``old_logprobs`` (None or absent: on-policy, ratio 1) and ``rollout_logprobs`` (engine log-probs, for TIS
    and the gap metric) are only read on rl_mask tokens.
    """

    labels: torch.Tensor
    """[T] long: target vocabulary id at each position (logits at t predict labels[t]); < 0 = no target."""
    sft_mask: torch.Tensor
    """[T] bool: expert-prefix targets that carry the prefix objective."""
    rl_mask: torch.Tensor
    """[T] bool: continuation targets (the policy's own tokens); disjoint from sft_mask."""
    advantages: torch.Tensor
    """[T] float: the sequence advantage copied onto each of its tokens."""
    token_weight: torch.Tensor
    """[T] float: aggregation weight (global denominator included), 0 off the loss tokens."""
    entropy_weight: NotRequired[torch.Tensor | None]
    """[T] float: the entropy bonus's weight (global denominator included), 0 off its tokens; None or absent:
    token_weight (entropy_mode="loss_tokens")."""
    old_logprobs: NotRequired[torch.Tensor | None]
    """[T] float: log-probs of the policy that generated the batch, as the trainer computes them."""
    rollout_logprobs: NotRequired[torch.Tensor | None]
    """[T] float: log-probs reported by the rollout engine."""


METRIC_MEANS: dict[str, tuple[str, str]] = {
    "clip_fraction": ("clipped_tokens", "rl_tokens"),
    "prefix_p_mean": ("prefix_p_sum", "sft_tokens"),
    "prefix_outside_trust_region": ("prefix_outside_trust_region_tokens", "sft_tokens"),
    "entropy_mean": ("entropy_sum", "loss_tokens"),
    "logprob_gap_mean": ("logprob_gap_abs_sum", "rl_tokens"),
    "tis_truncated_fraction": ("tis_truncated_tokens", "rl_tokens"),
}
"""Mean metric -> (summed metric, the count it is normalized by). The loss parts (sft_loss, pg_loss,
entropy_loss) already carry the global weights: their sums over micro-batches and ranks are final."""


def _sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum().detach().float()


def trapo_loss(
    logits: torch.Tensor,
    batch: TokenBatch,
    cfg: LossConfig,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TRAPO loss of one micro-batch and its metric sums.

    Args:
        logits: ``[T, V/TP]`` this tensor-parallel rank's vocabulary shard, any float dtype.
        batch: the per-token inputs (:class:`TokenBatch`).
        cfg: the objective.
        tp_group: tensor-parallel group; None (or a group of one) for TP=1.
    Returns:
        ``(loss, metrics)``: loss 0-d fp32 (fp64 for fp64 logits), ``sum_t token_weight * per_token_loss``
        (identical on all TP ranks); metrics 0-d fp32 SUMS, to be summed over micro-batches and DP ranks,
        then divided as in :data:`METRIC_MEANS` by :func:`finalize_metrics`:
        ``sft_tokens``, ``rl_tokens``, ``loss_tokens`` (counts); ``sft_loss``, ``pg_loss``, ``entropy_loss``
        (weighted loss parts, already normalized); ``clipped_tokens`` (/ rl_tokens); ``prefix_p_sum`` and
        ``prefix_outside_trust_region_tokens`` (p < trsft_alpha; / sft_tokens); ``entropy_sum``
        (/ loss_tokens); ``logprob_gap_abs_sum`` (|old - rollout| log-prob, 0 without rollout_logprobs) and
        ``tis_truncated_tokens`` (/ rl_tokens).
    """
    logp, entropy = vocab_parallel_logprobs_entropy(
        logits, batch["labels"], tp_group, cfg.temperature, cfg.chunk_tokens
    )
    return trapo_loss_from_logprobs(logp, entropy, batch, cfg)


def trapo_loss_from_logprobs(
    logp: torch.Tensor, entropy: torch.Tensor, batch: TokenBatch, cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`trapo_loss` from per-token ``logp`` [T] and ``entropy`` [T] (differentiable, temperature
    already applied) however they were computed; same returns. Labels are not read here."""
    sft_mask = batch["sft_mask"].to(torch.bool)
    rl_mask = batch["rl_mask"].to(torch.bool)
    loss_mask = sft_mask | rl_mask
    if cfg.entropy_coef == 0.0:
        entropy = entropy.detach()  # metric only: the kernel then skips the entropy terms in backward
    weight = batch["token_weight"].to(logp.dtype)
    zero = torch.zeros_like(logp)

    # Prefix tokens: inputs masked BEFORE the nonlinearity so off-mask garbage can never produce inf/NaN.
    sft_per_token = torch.where(
        sft_mask, PREFIX_OBJECTIVES[cfg.prefix_objective](torch.where(sft_mask, logp, zero), cfg), zero
    )

    old = batch.get("old_logprobs")
    old = logp.detach() if old is None else old.to(logp.dtype)
    pg_per_token, clipped = policy_gradient_loss(
        logp, old, batch["advantages"], rl_mask, cfg.clip_ratio_low, cfg.clip_ratio_high
    )
    if cfg.continuation_objective == "none":
        pg_per_token = zero
    rollout = batch.get("rollout_logprobs")
    gap = zero if rollout is None else (old - rollout.to(logp.dtype)).abs()
    truncated = torch.zeros_like(rl_mask)
    if cfg.tis_cap is not None:
        if rollout is None:
            raise ValueError("LossConfig.tis_cap is set but the batch has no rollout_logprobs")
        tis, truncated = tis_weights(old, rollout.to(logp.dtype), rl_mask, cfg.tis_cap)
        pg_per_token = pg_per_token * tis

    ent_weight = batch.get("entropy_weight")
    ent_weight = weight if ent_weight is None else ent_weight.to(logp.dtype)
    ent_per_token = entropy_bonus(entropy, ent_weight > 0, cfg.entropy_coef)
    sft_loss = (weight * sft_per_token).sum()
    pg_loss = (weight * pg_per_token).sum()
    ent_loss = (ent_weight * ent_per_token).sum()
    loss = sft_loss + pg_loss + ent_loss

    p = logp.detach().exp()
    metrics = {
        "sft_tokens": sft_mask.sum().float(),
        "rl_tokens": rl_mask.sum().float(),
        "loss_tokens": loss_mask.sum().float(),
        "sft_loss": sft_loss.detach(),
        "pg_loss": pg_loss.detach(),
        "entropy_loss": ent_loss.detach(),
        "clipped_tokens": clipped.sum().float(),
        "prefix_p_sum": _sum(p, sft_mask),
        "prefix_outside_trust_region_tokens": (sft_mask & (p < cfg.trsft_alpha)).sum().float(),
        "entropy_sum": _sum(entropy, loss_mask),
        "logprob_gap_abs_sum": _sum(gap, rl_mask),
        "tis_truncated_tokens": truncated.sum().float(),
    }
    return loss, metrics


def finalize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Means from metric sums (already summed over micro-batches and ranks): every entry of
    :data:`METRIC_MEANS` divided by its count (0 when the count is 0), plus the sums themselves."""
    out = dict(sums)
    for name, (num, den) in METRIC_MEANS.items():
        out[name] = sums[num] / sums[den].clamp(min=1)
    return out
