"""Megatron training mechanics: DDP wrapping, the (distributed) optimizer and its LR schedule, and one
forward/backward over a list of micro-batches through megatron-core's own ``forward_backward_func``.

Losses are global sums: every loss function returns ``sum(token_weight * per_token_loss)`` where the weights
were normalised once per step over the global batch. So the config runs with ``calculate_per_token_loss``
(the schedule neither divides by the micro-batch count nor DDP by the data-parallel size) and the gradient is
the same whatever the micro-batching, DP, PP or TP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trapo_megatron import faults
from trapo_megatron.algo.masks import IGNORE_LABEL
from trapo_megatron.data import packing
from trapo_megatron.megatron import model_builder, platform

MicroBatch = dict[str, Any]
"""One packed micro-batch (data/packing.py pack_row): ``tokens`` (1, S) long, ``position_ids`` (1, S) long,
``cu_seqlens`` (n + 1,) int32 boundaries of the packed sequences, ``max_seqlen`` (int), and any per-token
tensors (S,) the loss needs. No mask: the local attention path builds the block-diagonal one on the device when it runs."""

LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(logits (S, V/TP), micro_batch) -> (global-normalised loss sum, metric sums)``."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam through megatron-core's optimizer (distributed optimizer by default)."""

    lr: float = 1e-6
    """Peak learning rate (paper: 5e-6 constant; official script: 1e-6)."""
    min_lr: float = 0.0
    """Floor of the decay schedules."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    decay_all_parameters: bool = False
    """Decay biases and norm weights too (the official run: torch AdamW over every parameter,
    verl/trapo_src/mix_fsdp_worker.py:229-241). False: megatron-core's default, which skips every 1-D
    parameter and bias (get_standard_config_overrides in megatron/core/optimizer/__init__.py, 0.19.2)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr must be in [0, optimizer.lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_grad < 0:
            raise ValueError(f"optimizer.clip_grad must be >= 0, got {self.clip_grad}")


def wrap_ddp(chunks: list[Any], use_distributed_optimizer: bool = True) -> list[Any]:
    """Megatron DDP around each model chunk (contiguous fp32 grad buffers, reduce-scatter with ZeRO-1)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    # check_for_nan_in_grad stays off: it makes a NaN a fatal error inside the grad reduction (megatron's rerun
    # state machine, param_and_grad_buffer.check_grads); optimizer_step skips such a step on every rank instead.
    # overlap_grad_reduce stays off too: the fused output layer sums the output weight's gradient into
    # main_grad in forward and returns none, and DDP's hook asserts a .grad under overlap.
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
    )
    with platform.cuda_literals_on_cpu():
        wrapped = [
            DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
    for c in wrapped:
        c.config.finalize_model_grads_func = _finalize_grads
    return wrapped


def _finalize_grads(chunks: list[Any], num_tokens: Any = None, **kwargs: Any) -> None:
    """DP reduce, tied-embedding all-reduce across PP stages; never rescale by a token count, because our
    loss is already a globally normalised sum."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(chunks, None, **kwargs)


def build_optimizer(ddp_chunks: list[Any], cfg: OptimizerConfig, total_steps: int) -> tuple[Any, Any]:
    """(megatron optimizer, LR scheduler) for DDP-wrapped chunks."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model_config = ddp_chunks[0].config
    mcfg = MegatronOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, use_distributed_optimizer=cfg.use_distributed_optimizer,
        bf16=model_config.bf16, fp16=model_config.fp16, params_dtype=model_config.params_dtype,
    )
    with platform.cuda_literals_on_cpu():
        # An empty override table replaces megatron's standard one, whose only entry (no decoupled_lr here)
        # is the wd_mult=0 of 1-D parameters and biases.
        optimizer = get_megatron_optimizer(mcfg, ddp_chunks, config_overrides={} if cfg.decay_all_parameters
                                           else None)
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def forward_backward(
    chunks: list[Any], micro_batches: list[MicroBatch], loss_fn: LossFn, *, forward_only: bool = False,
    hidden_states: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run megatron-core's schedule (1F1B with PP) over ``micro_batches``.

    ``hidden_states``: the last stage hands ``loss_fn`` the final hidden states ``(S, h)`` (``S/TP`` rows with
    sequence parallelism) instead of the logits: GPTModel's ``output_processor`` hook returns them in place
    of running its output layer (for the fused output layer, megatron/fused_output.py).

    Returns the metric dicts of every micro-batch on the last pipeline stage (empty list elsewhere). Each dict
    has ``loss`` (a clone: the schedule edits its loss in place) plus the loss function's metric sums.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    feats = model_builder.features_of(chunks[0])
    thd = feats.transformer_engine
    if feats.sequence_parallel:  # the row is scattered over the TP ranks: S must divide by TP
        tp = chunks[0].config.tensor_model_parallel_size
        micro_batches = [packing.pad_row(mb, tp, {"labels": IGNORE_LABEL}) for mb in micro_batches]

    dev = platform.device()
    hook = {"output_processor": _final_hidden_states} if hidden_states else {}

    def forward_step(data_iterator, model):
        mb = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
              for k, v in next(data_iterator).items()}
        if thd:  # padding-free THD attention over the packed sequences (Transformer Engine): no mask at all
            logits = model(mb["tokens"], mb["position_ids"], None, labels=None,
                           packed_seq_params=packed_seq_params(mb["cu_seqlens"], mb["max_seqlen"]), **hook)
        else:  # local attention: the explicit block-diagonal causal mask, built for this forward only
            mask = packing.block_causal_mask(mb["cu_seqlens"], dev)
            logits = model(mb["tokens"], mb["position_ids"], mask, labels=None, **hook)

        def loss_func(output: torch.Tensor):
            # (1, S, V/TP) -> (S, V/TP)
            loss, metrics = loss_fn(output.reshape(-1, output.shape[-1]), mb)
            reported = {"loss": loss.detach().clone(), **{k: v.detach() for k, v in metrics.items()}}
            return loss, torch.ones((), dtype=torch.int), reported

        return logits, loss_func

    seq_len = max(mb["tokens"].shape[1] for mb in micro_batches)
    with platform.cuda_literals_on_cpu():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=1,
            forward_only=forward_only,
        )
    return list(out)


def _final_hidden_states(hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
    """GPTModel's output_processor (megatron-core 0.19.2 models/gpt/gpt_model.py, _postprocess): called with
    the decoder's output after the final norm, its return value is the model's output."""
    return hidden_states


def packed_seq_params(cu_seqlens: torch.Tensor, longest: int) -> Any:
    """THD boundaries of one packed row for Transformer Engine attention (``longest``: the longest packed
    sequence, from the host: pack_row's ``max_seqlen``)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(device=platform.device(), dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def optimizer_step(optimizer: Any, scheduler: Any, loss_finite: bool) -> tuple[bool, float, str]:
    """One optimizer step unless the loss (``loss_finite``, already agreed by every rank) or the gradient
    norm is non-finite (grads were reduced by DDP's finish_grad_sync inside the schedule).

    The gradient norm megatron computes is reduced over the model-parallel group (and over DP with the
    distributed optimizer), so every rank sees the same norm and takes the same decision. In bf16/fp32 megatron
    has no loss scaler and would apply a NaN update: the norm is computed first here (one extra pass over the
    gradients and a scalar all-reduce) and the step is skipped. With fp16 the loss scaler's own inf/NaN check
    skips (and its ``prepare_grads`` must run once only). A skipped step leaves parameters, optimizer moments,
    the Adam step count and the LR schedule untouched (megatron's convention: the scheduler advances only on
    a successful update).

    Returns (applied, grad_norm, which quantity was non-finite: "" | "loss" | "grad_norm" | "loss, grad_norm").
    """
    scaler = any(getattr(o, "grad_scaler", None) for o in getattr(optimizer, "chained_optimizers", [optimizer]))
    grad_norm = float("nan")
    with platform.cuda_literals_on_cpu():
        if not scaler:
            optimizer.prepare_grads()
            grad_norm = float(optimizer.get_grad_norm())
        bad = [] if loss_finite else ["loss"]
        if not scaler and not math.isfinite(grad_norm):
            bad.append("grad_norm")
        if bad:
            return False, grad_norm, ", ".join(bad)
        faults.fire("optimizer")
        applied, norm, _ = optimizer.step()
    if applied:
        scheduler.step(increment=1)
    return bool(applied), float(norm if norm is not None else grad_norm), "" if applied else "grad_norm"


def zero_grad(ddp_chunks: list[Any], optimizer: Any) -> None:
    for c in ddp_chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
