"""The output layer fused with the log-prob / entropy kernels and the TRAPO loss: hidden states in, loss (or
per-token statistics) out, the ``[T, V/P]`` logits never materialised.

    logits = hidden @ weight.T           hidden [T, h] (the final norm's output), weight [V/P, h]
    logp[t], entropy[t]                  as in vocab_parallel.py (temperature applied)

Two ways to get the gradients (``loss.fused_output_grads``):

- "forward" (:class:`_FusedOutputLoss`; what "auto" runs in the trainer): the TRAPO loss is a sum of
  per-token terms whose weights are fixed before the step, so each token's dL/dlogits is known in forward as
  soon as its log-partition and entropy are. Forward computes a GEMM chunk's logits once
  (chunking.forward_chunk_tokens), then, sub-chunk by sub-chunk, their statistics (two all-reduces), the
  per-token loss derivatives and dL/dlogits over the logits, then both gradient GEMMs: three output-layer
  GEMMs like the unfused path. The weight gradient is summed in fp32 over the chunks, straight into Megatron
  DDP's ``main_grad`` when the weight has one (megatron's gradient-accumulation fusion does the same);
  backward only scales the saved hidden-state gradient.
- "recompute" (:func:`fused_logprobs_entropy`, any differentiable use of logp / entropy; "auto" picks it
  for a 16-bit weight without main_grad, whose fp32 gradient sum forward would have to allocate): forward
  walks token chunks and keeps only per-token statistics (the two all-reduces of
  :func:`vocab_parallel.combine_partials` over all T). Backward walks VOCABULARY blocks ``[T, Vb]``: it
  recomputes the block's logits, turns them into dL/dlogits with the saved log-partition and entropy, and then

    grad_weight[block] = dlogits_block.T @ hidden     one GEMM per block, written in place: exact, no sum
    grad_hidden       += dlogits_block @ weight[block] fp32 accumulator [T, h] (h << V)

  so no weight-sized accumulator exists besides the weight gradient itself, and only ``[T, Vb]`` work
  buffers; one GEMM more.

The tensor-parallel reductions are those of megatron-core 0.19.2's ColumnParallelLinear output layer
(tensor_parallel/layers.py, ``allreduce_dgrad`` / ``sequence_parallel``), done with megatron's own mapping
functions around the kernel: with sequence parallelism the sequence-sharded hidden states are all-gathered
in forward and their gradient reduce-scattered in backward (gather_from_sequence_parallel_region with
tensor_parallel_output_grad=True); without it the hidden-state gradient is all-reduced over TP
(copy_to_tensor_model_parallel_region). Unlike megatron, which saves the sequence shard and gathers it again
in backward, the gathered ``[T, h]`` hidden states are kept (``h/V`` of the logits' size). A weight gradient
returned as a plain ``.grad`` is added to ``main_grad`` by megatron's DDP hook; a tied weight (the
embedding's) receives both contributions either way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron.algo.loss import LossConfig, TokenBatch, trapo_loss_from_logprobs
from trapo_megatron.megatron import chunking
from trapo_megatron.megatron import vocab_parallel as vp


def _vocab_blocks(num_tokens: int, vocab_local: int, chunk_tokens: int | None, device: torch.device):
    """Column blocks of the backward with as many elements as one forward token chunk."""
    first = next(vp._chunks(num_tokens, vocab_local, chunk_tokens, device), (0, num_tokens))
    width = max(1, (first[1] - first[0]) * vocab_local // max(num_tokens, 1))
    for start in range(0, vocab_local, width):
        yield start, min(start + width, vocab_local)


class _FusedOutputLogProbEntropy(torch.autograd.Function):
    """hidden [T, h], weight [V/P, h] (same float dtype), labels [T] long (global ids) -> logp [T],
    entropy [T] | None in fp32 (fp64 for fp64 inputs). Collectives: forward as vocab_parallel's kernel;
    backward none (the TP reduction of the hidden-state gradient is the mapping function's, outside)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, temperature, with_entropy, chunk_tokens):
        logp, entropy, saved = vp.forward_statistics(ctx, lambda a, b: hidden[a:b] @ weight.t(), hidden.dtype,
                                                     weight.shape[0], labels, group, temperature, with_entropy,
                                                     chunk_tokens)
        ctx.save_for_backward(hidden, weight, labels, *saved)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, log_partition, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
        acc, inv_temp = log_partition.dtype, ctx.inv_temp
        k0, k1, hit = vp.grad_coefficients(grad_logp, grad_entropy, labels, log_partition, entropy, inv_temp)

        grad_weight = torch.empty_like(weight)
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        blocks = list(_vocab_blocks(num_tokens, vocab_local, ctx.chunk_tokens, hidden.device))
        cols = max((b - a for a, b in blocks), default=0)
        lp_buf = torch.empty((num_tokens, cols), dtype=acc, device=hidden.device)
        p_buf = torch.empty_like(lp_buf)
        offset = ctx.rank * vocab_local
        for a, b in blocks:
            w = weight[a:b]
            index, held = vp._local_targets(labels, b - a, offset + a)
            g = vp.logits_grad_(hidden @ w.t(), lp_buf[:, : b - a], p_buf[:, : b - a], log_partition, k0, k1,
                                index, torch.where(held, hit, torch.zeros_like(hit)), inv_temp)
            g = g.to(weight.dtype)  # the logits gradient in the model dtype, as the unfused path has it
            torch.mm(g.t(), hidden, out=grad_weight[a:b])
            if acc == weight.dtype:
                grad_hidden.addmm_(g, w)
            else:
                grad_hidden += g @ w
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None


TOKEN_FIELDS = tuple(TokenBatch.__annotations__)
"""The [T]-sized fields of a micro-batch that the loss reads: the ones a token chunk slices."""

class _FusedOutputLoss(torch.autograd.Function):
    """hidden [T, h], weight [V/P, h] -> the TRAPO loss (0-d, fp32), its gradients computed IN FORWARD.

    The loss is a sum of per-token terms whose weights are fixed before the step (``token_weight``,
    ``entropy_weight``: algo/loss.py), so each token's dL/dlogits is known as soon as its log-partition and
    entropy are. Forward walks GEMM chunks of tokens (chunking.forward_chunk_tokens): the chunk's logits in
    one GEMM, then, sub-chunk by sub-chunk (chunking.forward_sub_chunk_tokens, fp32 work buffers of that
    size), the statistics (two [S]-sized all-reduces), the per-token loss derivatives (autograd of
    :func:`trapo_loss_from_logprobs` on the sub-chunk) and dL/dlogits written over the logits (no second
    exp); then both gradient GEMMs of the chunk. Three output-layer GEMMs in all, as the unfused path;
    backward only scales the saved hidden-state gradient by the upstream gradient.

    The weight gradient is summed over the chunks in fp32 (the GEMM's own accumulation for an fp32 weight;
    block by block through a cache-sized buffer for a 16-bit one). ``main_grad``: Megatron DDP's fp32
    gradient buffer of the weight, summed into directly as its gradient-accumulation fusion does
    (tensor_parallel/layers.py), so no weight-sized tensor is added at all; backward then returns no weight
    gradient (a tied embedding's own gradient still reaches ``main_grad`` through DDP's hook, as
    ``grad_added_to_main_grad`` stays False) and requires an upstream gradient of 1, which megatron's schedule
    gives a per-token loss without ``grad_scale_func`` (step.py). Without it, an fp32 sum lives from forward to
    backward and is returned as ``.grad``. ``metrics`` (a dict) receives the loss's metric sums."""

    @staticmethod
    def forward(ctx, hidden, weight, batch, cfg, group, metrics, main_grad):
        num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
        _, rank = vp._group_size_rank(group)
        device, kind = hidden.device, chunking.device_kind(hidden.device.type)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        index, held = vp._local_targets(batch["labels"], vocab_local, rank * vocab_local)
        tokens = {k: v for k, v in batch.items() if k in TOKEN_FIELDS and v is not None}
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if main_grad is None else main_grad
        low_precision = weight.dtype != acc
        rows = cfg.chunk_tokens or chunking.forward_chunk_tokens(num_tokens, vocab_local, kind)
        sub = chunking.forward_sub_chunk_tokens(rows, num_tokens, vocab_local, kind)
        x_buf = torch.empty((min(rows, num_tokens), vocab_local), dtype=weight.dtype, device=device)
        e_buf = torch.empty((min(sub, num_tokens), vocab_local), dtype=acc, device=device)
        u_buf = torch.empty_like(e_buf) if low_precision else None  # fp32: z - m overwrites the logits
        block = chunking.weight_grad_block_rows(vocab_local, weight.shape[1])
        # the block's product, and its fp32 copy: a mixed-dtype add would allocate that copy for every block
        w_buf = f_buf = None
        if low_precision:
            w_buf = torch.empty((block, weight.shape[1]), dtype=weight.dtype, device=device)
            f_buf = torch.empty((block, weight.shape[1]), dtype=acc, device=device)
        loss = torch.zeros((), dtype=acc, device=device)
        for a, b in vp._chunks(num_tokens, vocab_local, rows, device):
            x = torch.mm(hidden[a:b], weight.t(), out=x_buf[: b - a])
            for s, t in vp._chunks(b - a, vocab_local, sub, device):
                rows_st = slice(a + s, a + t)
                loss += _logits_to_grad_(x[s:t], e_buf, u_buf, index[rows_st], held[rows_st],
                                         {k: v[rows_st] for k, v in tokens.items()}, cfg, group, metrics)
            torch.mm(x, weight, out=grad_hidden[a:b])  # x now holds dL/dlogits in the model dtype
            if not low_precision:
                grad_weight.addmm_(x.t(), hidden[a:b])
                continue
            for r in range(0, vocab_local, block):
                n = min(block, vocab_local - r)
                torch.mm(x[:, r : r + n].t(), hidden[a:b], out=w_buf[:n])
                grad_weight[r : r + n] += f_buf[:n].copy_(w_buf[:n])
        ctx.main_grad = main_grad
        ctx.save_for_backward(grad_hidden, None if main_grad is not None else grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place (no second weight-sized tensor): this backward runs once, as megatron's schedule does
        grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.main_grad is not None:
            upstream = float(grad_loss)
            if not math.isfinite(upstream):  # as upstream * gradient would be: the step sees a non-finite grad
                ctx.main_grad.add_(upstream)
            elif upstream != 1.0:
                raise RuntimeError(f"fused output layer: the weight gradient went into main_grad in forward, so "
                                   f"the loss's upstream gradient must be 1, got {upstream} (a loss scale or "
                                   "grad_scale_func): set loss.fused_output_grads=recompute")
        else:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight, None, None, None, None, None


def _logits_to_grad_(x: torch.Tensor, e_buf: torch.Tensor, u_buf: torch.Tensor | None, index: torch.Tensor,
                     held: torch.Tensor, batch: dict, cfg: LossConfig, group: Any, metrics: dict) -> torch.Tensor:
    """Overwrite the logits ``x`` [S, V/P] of S tokens with dL/dlogits (in x's dtype) and return their loss:
    statistics through the fp32 work buffers (``u_buf`` None: x itself has the accumulation dtype and holds
    z - m), the all-reduces of :func:`vp.combine_partials`, the per-token loss derivatives, then
    p (k1 log p + k0) + hit from e^(z - m) and z - m: no second exp."""
    n, acc, inv_temp = x.shape[0], e_buf.dtype, 1.0 / cfg.temperature
    u, e = (x if u_buf is None else u_buf[:n]), e_buf[:n]
    local_max = torch.empty(n, dtype=acc, device=x.device)
    sums = torch.zeros(3, n, dtype=acc, device=x.device)
    vp.chunk_partials_(x, u, e, index, held, inv_temp, True, local_max, sums)
    log_partition, logp, entropy = vp.combine_partials(local_max, sums, batch["labels"], group, True)
    part, g_lp, g_ent = _chunk_loss(logp, entropy, batch, cfg, metrics)
    k0, k1, hit = vp.grad_coefficients(g_lp, g_ent, batch["labels"], log_partition, entropy, inv_temp)
    # with shift = m - logZ and s = e^shift: p = e s, log p = u + shift, so
    # p (k1 log p + k0) = e (u k1 s + (shift k1 + k0) s): one addcmul and one product over [S, V/P]
    shift = local_max - log_partition
    scale = torch.exp(shift)
    if k1 is not None:
        torch.addcmul(((shift * k1 + k0) * scale).unsqueeze(-1), u, (k1 * scale).unsqueeze(-1), out=u)
        g = u.mul_(e) if u is x else e.mul_(u)
    else:
        g = torch.mul(e, (k0 * scale).unsqueeze(-1), out=x if u is x else e)
    g.scatter_add_(1, index.unsqueeze(-1), torch.where(held, hit, 0.0).unsqueeze(-1))
    if g is not x:
        x.copy_(g)
    return part


def _chunk_loss(logp: torch.Tensor, entropy: torch.Tensor, batch: dict, cfg: LossConfig, metrics: dict):
    """(loss of one token chunk, dL/dlogp, dL/dentropy | None): :func:`trapo_loss_from_logprobs` on the
    chunk and its autograd w.r.t. the per-token statistics; the chunk's metric sums are added to
    ``metrics``."""
    with torch.enable_grad():
        logp, entropy = logp.requires_grad_(), entropy.requires_grad_()
        loss, chunk_metrics = trapo_loss_from_logprobs(logp, entropy, batch, cfg)
        grads = (torch.autograd.grad(loss, (logp, entropy), allow_unused=True) if loss.requires_grad
                 else (None, None))
    for k, v in chunk_metrics.items():
        metrics[k] = metrics[k] + v if k in metrics else v
    return loss.detach(), *grads


def fused_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-token log-probabilities and entropies of ``hidden @ weight.T``, differentiable w.r.t. both.

    Args:
        hidden: ``[S, h]`` (or ``[S, 1, h]``) final hidden states; with ``sequence_parallel`` this rank's
            sequence shard (S = T/P, shards in rank order), else all T tokens.
        weight: ``[V/P, h]`` this rank's rows of the output layer (the embedding's with tied embeddings).
        labels: ``[T]`` long global ids (shifted; < 0 = no target), every token of the micro-batch.
        group: the tensor-parallel group; ``None`` or a group of one means TP=1 (no collective).
        temperature: logits are divided by it.
        chunk_tokens: tokens per forward chunk (the backward's vocabulary blocks have as many elements).
        sequence_parallel: the hidden states are sequence-sharded over ``group`` (megatron's
            ``config.sequence_parallel``, which it switches off at TP=1).
    Returns:
        ``(logp [T], entropy [T])`` fp32, identical on every rank of ``group``.
    """
    hidden = _all_rows(hidden, labels.shape[0], group, sequence_parallel)
    return _FusedOutputLogProbEntropy.apply(hidden, weight, labels, group, float(temperature), True,
                                            chunk_tokens)


def _all_rows(hidden: torch.Tensor, num_labels: int, group: Any, sequence_parallel: bool) -> torch.Tensor:
    """``hidden`` ([S, h] or [S, 1, h]) as the [T, h] rows of every token of the micro-batch, in the tensor-
    parallel region (:func:`_to_tensor_parallel_region`); ValueError when they do not match the labels."""
    hidden = _to_tensor_parallel_region(hidden.reshape(-1, hidden.shape[-1]), group, sequence_parallel)
    if hidden.shape[0] != num_labels:
        raise ValueError(f"fused output layer: {hidden.shape[0]} hidden-state rows (after the sequence-parallel "
                         f"gather) but {num_labels} labels")
    return hidden


def _to_tensor_parallel_region(hidden: torch.Tensor, group: Any, sequence_parallel: bool) -> torch.Tensor:
    """What ColumnParallelLinear does to its input: all-gather from the sequence-parallel region (reduce-
    scatter of the gradient) with SP, else the identity whose gradient is all-reduced over TP."""
    if group is None or dist.get_world_size(group) == 1:
        return hidden
    from megatron.core.tensor_parallel import mappings

    from trapo_megatron.megatron import platform

    with platform.cuda_literals_on_cpu():
        if sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                                 group=group)
        return mappings.copy_to_tensor_model_parallel_region(hidden, group=group)


def trapo_loss_from_hidden(
    hidden: torch.Tensor, model: Any, batch: Any, cfg: LossConfig, tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`trapo_loss` of the logits that ``model``'s output layer would compute from ``hidden``, without
    them: gradients in forward (:class:`_FusedOutputLoss`) or recomputed in backward
    (:func:`fused_logprobs_entropy`), as :func:`chunking.grads_mode` resolves ``cfg.fused_output_grads``.
    ``model``: the (DDP-wrapped) last-stage GPTModel, whose output weight (the embedding's when tied, megatron's
    shared_embedding_or_output_weight) and sequence-parallel setting (its output layer's, off at TP=1) are
    used."""
    module = getattr(model, "module", model)
    if module.share_embeddings_and_output_weights:
        weight = module.shared_embedding_or_output_weight()
    else:
        weight = module.output_layer.weight
    sequence_parallel = module.output_layer.sequence_parallel
    mode = chunking.grads_mode(cfg.fused_output_grads, weight.dtype, _main_grad(weight) is not None)
    if mode == "recompute":
        logp, entropy = fused_logprobs_entropy(hidden, weight, batch["labels"], tp_group, cfg.temperature,
                                               cfg.chunk_tokens, sequence_parallel)
        return trapo_loss_from_logprobs(logp, entropy, batch, cfg)
    return fused_trapo_loss(hidden, weight, batch, cfg, tp_group, sequence_parallel)


def fused_trapo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: Any,
    cfg: LossConfig,
    group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`trapo_loss` (loss and metric sums) of ``hidden @ weight.T``, differentiable w.r.t. both, its
    gradients computed in forward (:class:`_FusedOutputLoss`). Shapes and the TP / SP arguments as
    :func:`fused_logprobs_entropy`; ``batch`` a :class:`TokenBatch` of every token of the micro-batch."""
    hidden = _all_rows(hidden, batch["labels"].shape[0], group, sequence_parallel)
    metrics: dict[str, torch.Tensor] = {}
    loss = _FusedOutputLoss.apply(hidden, weight, batch, cfg, group, metrics, _main_grad(weight))
    return loss, metrics


def _main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's Megatron DDP gradient buffer when this forward will be back-propagated into it (autograd
    recording, the weight trained) and it holds the fp32 sum the kernel makes; else None."""
    main_grad = getattr(weight, "main_grad", None)
    usable = (isinstance(main_grad, torch.Tensor) and torch.is_grad_enabled() and weight.requires_grad
              and main_grad.shape == weight.shape
              and main_grad.dtype == torch.promote_types(weight.dtype, torch.float32))
    return main_grad if usable else None
