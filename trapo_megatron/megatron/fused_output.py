"""The output layer fused with the log-prob / entropy kernels and the TRAPO loss: hidden states in, loss (or
per-token statistics) out, the ``[T, V/P]`` logits never materialised.

    logits = hidden @ weight.T           hidden [T, h] (the final norm's output), weight [V/P, h]
    logp[t], entropy[t]                  as in vocab_parallel.py (temperature applied)

Two ways to get the gradients (``loss.fused_output_grads``):

- "forward" (:class:`_FusedOutputLoss`; "auto" picks it for an fp32 weight): the TRAPO loss is a sum of per-token terms whose
  weights are fixed before the step, so each token chunk's dL/dlogits is known in forward as soon as the
  chunk's log-partition and entropy are. Forward computes the chunk's logits once, its statistics (two
  [C]-sized all-reduces), the per-token loss derivatives, dL/dlogits in the same buffers, and both gradient
  GEMMs: three output-layer GEMMs like the unfused path. The weight gradient is summed over the chunks (in
  fp32 for a 16-bit weight) and held until backward, which only scales the saved gradients. Chunks are large
  (chunking.MIN_FORWARD_CHUNK_TOKENS), because each one reads and writes that sum.
- "recompute" (:func:`fused_logprobs_entropy`, any differentiable use of logp / entropy; "auto" picks it
  for a 16-bit weight, whose fp32 gradient sum over the chunks would cost more than the recomputation): forward walks token
  chunks and keeps only per-token statistics (the two all-reduces of :func:`vocab_parallel.combine_partials`
  over all T). Backward walks VOCABULARY blocks ``[T, Vb]``: it recomputes the block's logits, turns them
  into dL/dlogits with the saved log-partition and entropy, and then

    grad_weight[block] = dlogits_block.T @ hidden     one GEMM per block, written in place: exact, no sum
    grad_hidden       += dlogits_block @ weight[block] fp32 accumulator [T, h] (h << V)

  so no weight-sized accumulator exists besides the weight gradient itself, and only ``[T, Vb]`` work
  buffers: the least memory, one GEMM more.

The tensor-parallel reductions are those of megatron-core 0.19.2's ColumnParallelLinear output layer
(tensor_parallel/layers.py, ``allreduce_dgrad`` / ``sequence_parallel``), done with megatron's own mapping
functions around the kernel: with sequence parallelism the sequence-sharded hidden states are all-gathered
in forward and their gradient reduce-scattered in backward (gather_from_sequence_parallel_region with
tensor_parallel_output_grad=True); without it the hidden-state gradient is all-reduced over TP
(copy_to_tensor_model_parallel_region). Unlike megatron, which saves the sequence shard and gathers it again
in backward, the gathered ``[T, h]`` hidden states are kept (``h/V`` of the logits' size). The weight gradient
is returned as a plain ``.grad`` (megatron's DDP hook adds it to ``main_grad``); a tied weight (the
embedding's) simply receives both contributions.
"""

from __future__ import annotations

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
    ``entropy_weight``: algo/loss.py), so each token chunk's dL/dlogits is known as soon as the chunk's
    log-partition and entropy are (after two [C]-sized all-reduces): forward computes the chunk's logits
    once, its statistics, the per-token loss derivatives (autograd of :func:`trapo_loss_from_logprobs` on
    the chunk), dL/dlogits in the same buffers (no second exp), and the chunk's two gradient GEMMs. Three
    output-layer GEMMs in all, as the unfused path; backward only scales the saved gradients by the
    upstream gradient. The price: the weight gradient [V/P, h] (fp32 for a low-precision weight) lives
    from forward to backward. ``metrics`` (a dict) receives the loss's metric sums."""

    @staticmethod
    def forward(ctx, hidden, weight, batch, cfg, group, metrics):
        num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
        _, rank = vp._group_size_rank(group)
        inv_temp, device = 1.0 / cfg.temperature, hidden.device
        acc = torch.promote_types(hidden.dtype, torch.float32)
        labels = batch["labels"]
        index, held = vp._local_targets(labels, vocab_local, rank * vocab_local)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=device)
        low_precision = weight.dtype != acc
        block = -(-vocab_local // chunking.WEIGHT_GRAD_BLOCKS)
        chunk_tokens = cfg.chunk_tokens or chunking.forward_chunk_tokens(vocab_local, chunking.device_kind(device.type))
        chunks = list(vp._chunks(num_tokens, vocab_local, chunk_tokens, device))
        rows = max((b - a for a, b in chunks), default=0)
        x_buf = torch.empty((rows, vocab_local), dtype=weight.dtype, device=device)  # one chunk's logits
        e_buf = torch.empty((rows, vocab_local), dtype=acc, device=device)
        u_buf = torch.empty_like(e_buf) if low_precision else None  # fp32: z - m overwrites the logits
        w_buf = torch.empty((block, weight.shape[1]), dtype=weight.dtype, device=device) if low_precision else None
        loss = torch.zeros((), dtype=acc, device=device)
        for a, b in chunks:
            x = torch.mm(hidden[a:b], weight.t(), out=x_buf[: b - a])
            u, e = (x if u_buf is None else u_buf[: b - a]), e_buf[: b - a]
            local_max = torch.empty(b - a, dtype=acc, device=device)
            sums = torch.zeros(3, b - a, dtype=acc, device=device)
            vp.chunk_partials_(x, u, e, index[a:b], held[a:b], inv_temp, True, local_max, sums)
            log_partition, logp, entropy = vp.combine_partials(local_max, sums, labels[a:b], group, True)
            part, g_lp, g_ent = _chunk_loss(logp, entropy, {k: v[a:b] for k, v in batch.items()
                                                            if k in TOKEN_FIELDS and v is not None}, cfg, metrics)
            loss += part
            k0, k1, hit = vp.grad_coefficients(g_lp, g_ent, labels[a:b], log_partition, entropy, inv_temp)
            # p = e^(z - m) e^(m - logZ), log p = (z - m) + (m - logZ): dL/dlogits without a second exp
            shift = local_max - log_partition
            p, log_p = e.mul_(torch.exp(shift).unsqueeze(-1)), u.add_(shift.unsqueeze(-1))
            p.mul_(log_p.mul_(k1.unsqueeze(-1)).add_(k0.unsqueeze(-1)) if k1 is not None else k0.unsqueeze(-1))
            p.scatter_add_(1, index[a:b].unsqueeze(-1), torch.where(held[a:b], hit, 0.0).unsqueeze(-1))
            g = x.copy_(p) if low_precision else p  # dL/dlogits in the model dtype, as the unfused path has it
            torch.mm(g, weight, out=grad_hidden[a:b])
            if not low_precision:
                grad_weight.addmm_(g.t(), hidden[a:b])
                continue
            for r in range(0, vocab_local, block):
                product = torch.mm(g[:, r : r + block].t(), hidden[a:b], out=w_buf[: min(block, vocab_local - r)])
                grad_weight[r : r + block] += product
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place (no second weight-sized tensor): this backward runs once, as megatron's schedule does
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss.to(grad_weight.dtype)), \
            None, None, None, None


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
    (:func:`fused_logprobs_entropy`), as :func:`chunking.grads_mode` resolves ``cfg.fused_output_grads``. ``model``: the (DDP-wrapped)
    last-stage GPTModel, whose output weight (the embedding's when tied, megatron's
    shared_embedding_or_output_weight) and sequence-parallel setting (its output layer's, off at TP=1) are
    used."""
    module = getattr(model, "module", model)
    if module.share_embeddings_and_output_weights:
        weight = module.shared_embedding_or_output_weight()
    else:
        weight = module.output_layer.weight
    sequence_parallel = module.output_layer.sequence_parallel
    if chunking.grads_mode(cfg.fused_output_grads, weight.dtype) == "recompute":
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
    loss = _FusedOutputLoss.apply(hidden, weight, batch, cfg, group, metrics)
    return loss, metrics
