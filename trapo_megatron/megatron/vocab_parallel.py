"""Vocab-parallel kernels: selected-token log-probability and entropy from logits sharded over the vocabulary.

Megatron's output layer leaves each tensor-parallel (TP) rank with a contiguous slice of the vocabulary:
rank r of a TP group of size P holds logits ``[T, V/P]`` for vocabulary ids ``[r*V/P, (r+1)*V/P)``. The
kernels here turn those shards into per-token quantities that every rank of the group agrees on, without ever
gathering the full ``[T, V]`` logits:

    logp[t]    = log softmax(z[t])[labels[t]]          z = logits / temperature
    entropy[t] = -sum_v softmax(z[t])_v * log softmax(z[t])_v

Numerics and memory:
- all arithmetic is fp32 whatever the logits dtype (bf16/fp16 logits are upcast chunk by chunk; fp64 logits
  stay fp64, which the exactness tests use);
- the work is chunked over tokens, so besides the gradient buffer (one logits-sized tensor, in the logits
  dtype, which autograd needs anyway) only two ``[chunk, V/P]`` fp32 work buffers exist, allocated once per
  call and reused chunk after chunk (by default together at most 1/16 of the logits' elements: chunking.py);
- forward uses two all-reduces over ``[T]``-sized vectors (MAX of the local maxima, then SUM of the rescaled
  local partition sums, entropy partials and target logits); backward needs NO collective, because the
  gradient of a rank's shard depends only on that shard and on the per-token global log-partition and
  entropy saved in forward.

This module does not import Megatron: the TP group is a plain ``torch.distributed`` process group, and
``None`` (or a group of one) means TP=1, in which case no collective is issued at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron.megatron import chunking


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _chunks(num_tokens: int, vocab_local: int, chunk_tokens: int | None, device: torch.device):
    if chunk_tokens is None:
        chunk_tokens = chunking.kernel_chunk_tokens(num_tokens, vocab_local, chunking.device_kind(device.type))
    for start in range(0, num_tokens, chunk_tokens):
        yield start, min(start + chunk_tokens, num_tokens)


def _local_targets(labels: torch.Tensor, width: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a block of ``width`` vocabulary columns starting at global id ``offset``: (index into the block
    clamped to a valid column [T], whether the block holds the label [T])."""
    local = labels - offset
    held = (local >= 0) & (local < width) & (labels >= 0)
    return local.clamp(0, width - 1), held


def _upcast(chunk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``chunk`` itself if it already has the accumulation dtype, else its copy cast into ``buf`` (a
    mixed-dtype op would allocate a hidden cast temporary of the chunk's size)."""
    return chunk if chunk.dtype == buf.dtype else buf.copy_(chunk)


def chunk_partials_(
    x: torch.Tensor,
    u: torch.Tensor,
    e: torch.Tensor,
    index: torch.Tensor,
    held: torch.Tensor,
    inv_temp: float,
    with_entropy: bool,
    local_max: torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """One token chunk's share of :func:`local_partials`: logits ``x`` [C, V/P] (any float dtype), work
    buffers ``u``, ``e`` [C, V/P] in the accumulation dtype (``u`` may be ``x`` itself when it has that dtype
    and may be overwritten), ``index`` / ``held`` [C] from :func:`_local_targets`; writes ``local_max`` [C] and
    ``sums`` [3, C]. Afterwards ``u`` holds z - m and ``e`` holds e^(z - m)."""
    acc = u.dtype
    target = x.gather(1, index.unsqueeze(-1)).squeeze(-1).to(acc) * inv_temp
    m = x.amax(dim=-1).to(acc) * inv_temp
    local_max.copy_(m)
    torch.add(-m.unsqueeze(-1), _upcast(x, u), alpha=inv_temp, out=u)  # z - m
    torch.exp(u, out=e)
    torch.sum(e, dim=-1, out=sums[0])
    if with_entropy:  # sum_v e_v u_v as a batched dot product: no [C, V/P] temporary
        sums[1] = torch.bmm(e.unsqueeze(1), u.unsqueeze(2)).view(-1)
    sums[2] = torch.where(held, target, torch.zeros_like(target))


def local_partials(
    chunk_logits: Callable[[int, int], torch.Tensor],
    labels: torch.Tensor,
    vocab_local: int,
    rank: int,
    inv_temp: float,
    acc: torch.dtype,
    with_entropy: bool,
    chunk_tokens: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's per-token statistics, token chunk by token chunk: (local max of z [T], [3, T] = partition
    sum s_r = sum e^(z-m_r), entropy partial w_r = sum e^(z-m_r)(z-m_r) (0 without entropy), target z or 0).

    ``chunk_logits(a, b)`` gives the logits of tokens [a, b) of this shard (``[b-a, V/P]``, any float dtype):
    a slice of materialised logits, or the chunk computed from the hidden states (fused_output.py).
    """
    num_tokens, device = labels.shape[0], labels.device
    local_max = torch.empty(num_tokens, dtype=acc, device=device)
    sums = torch.zeros(3, num_tokens, dtype=acc, device=device)
    index, held = _local_targets(labels, vocab_local, rank * vocab_local)
    chunks = list(_chunks(num_tokens, vocab_local, chunk_tokens, device))
    rows = max((b - a for a, b in chunks), default=0)
    u_buf = torch.empty((rows, vocab_local), dtype=acc, device=device)  # the only [C, V/P] work buffers
    e_buf = torch.empty_like(u_buf)
    for a, b in chunks:
        chunk_partials_(chunk_logits(a, b), u_buf[: b - a], e_buf[: b - a], index[a:b], held[a:b], inv_temp,
                        with_entropy, local_max[a:b], sums[:, a:b])
    return local_max, sums


def combine_partials(
    local_max: torch.Tensor,
    sums: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log partition logZ [T], logp [T], entropy [T] | None) from every rank's :func:`local_partials`:
    all_reduce(MAX) of the local maxima, then all_reduce(SUM) of the partials rescaled to the global max M
    (e^(z-M) = e^(m_r-M) e^(z-m_r)). ``sums`` is consumed."""
    global_max = local_max.clone()
    _all_reduce(global_max, dist.ReduceOp.MAX, group)
    shift = local_max - global_max  # <= 0
    scale = torch.exp(shift)
    sums[1] = scale * (sums[1] + shift * sums[0])  # sum e^(z-M)(z-M), uses the unscaled s_r
    sums[0] = scale * sums[0]
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_partition = global_max + torch.log(sums[0])  # logZ [T]
    logp = torch.where(labels >= 0, sums[2] - log_partition, torch.zeros_like(log_partition))
    entropy = torch.log(sums[0]) - sums[1] / sums[0] if with_entropy else None
    return log_partition, logp, entropy


def forward_statistics(
    ctx: Any,
    chunk_logits: Callable[[int, int], torch.Tensor],
    dtype: torch.dtype,
    vocab_local: int,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """The forward shared by both autograd functions (logits given, or computed chunk by chunk): (logp,
    entropy, the tensors backward needs: log partition, entropy or a stand-in); records on ``ctx`` what
    backward reads (rank, inv_temp, with_entropy, chunk_tokens)."""
    _, rank = _group_size_rank(group)
    inv_temp = 1.0 / temperature
    acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 logits
    local_max, sums = local_partials(chunk_logits, labels, vocab_local, rank, inv_temp, acc, with_entropy,
                                     chunk_tokens)
    log_partition, logp, entropy = combine_partials(local_max, sums, labels, group, with_entropy)
    ctx.rank, ctx.inv_temp = rank, inv_temp
    ctx.with_entropy, ctx.chunk_tokens = with_entropy, chunk_tokens
    ctx.set_materialize_grads(False)
    return logp, entropy, (log_partition, entropy if with_entropy else log_partition)


def grad_coefficients(
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    labels: torch.Tensor,
    log_partition: torch.Tensor,
    entropy: torch.Tensor,
    inv_temp: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token constants of dL/dlogits_v = p_v (k1 log p_v + k0) + hit 1[v = label]: (k0, k1 | None, hit
    before the "this block holds the label" mask).

    d logp / dz_v = 1[v = label] - p_v ;  d H / dz_v = -p_v (log p_v + H)
    => dL/dz_v = -p_v (g_lp + g_H (log p_v + H)) + g_lp 1[v = label];  dL/dlogits = dL/dz / temperature.
    """
    acc = log_partition.dtype
    g_lp = (grad_logp if grad_logp is not None else torch.zeros_like(log_partition)).to(acc)
    g_lp = torch.where(labels >= 0, g_lp, torch.zeros_like(g_lp))
    k1 = -inv_temp * grad_entropy.to(acc) if grad_entropy is not None else None
    k0 = -inv_temp * (g_lp + grad_entropy.to(acc) * entropy if grad_entropy is not None else g_lp)
    return k0, k1, g_lp * inv_temp


def logits_grad_(
    x: torch.Tensor,
    log_p: torch.Tensor,
    p: torch.Tensor,
    log_partition: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor | None,
    index: torch.Tensor,
    hit: torch.Tensor,
    inv_temp: float,
) -> torch.Tensor:
    """dL/dlogits of a block of logits ``x`` [R, C] into ``p`` (fp32 [R, C], may be ``x`` itself when it
    already has the accumulation dtype); ``log_p`` is a work buffer of the same shape; the per-row
    constants are [R] (:func:`grad_coefficients`; ``hit`` already 0 where the block lacks the label)."""
    torch.add(-log_partition.unsqueeze(-1), _upcast(x, log_p), alpha=inv_temp, out=log_p)
    torch.exp(log_p, out=p)
    if k1 is not None:
        p.mul_(torch.addcmul(k0.unsqueeze(-1), log_p, k1.unsqueeze(-1), out=log_p))
    else:
        p.mul_(k0.unsqueeze(-1))
    return p.scatter_add_(1, index.unsqueeze(-1), hit.unsqueeze(-1))


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """logits [T, V/P] (any float dtype), labels [T] long (global ids) -> logp [T], entropy [T] | None,
    in fp32 (fp64 for fp64 logits).

    Forward collectives (on ``group``): all_reduce(MAX) of the per-token local max [T]; all_reduce(SUM) of
    [3, T] (partition sums and entropy partials rescaled to the global max, target logit). Backward: none.
    Labels < 0 mean "no target": their logp is 0 and they get no gradient through logp.
    """

    @staticmethod
    def forward(ctx, logits, labels, group, temperature, with_entropy, chunk_tokens):
        logp, entropy, saved = forward_statistics(ctx, lambda a, b: logits[a:b], logits.dtype, logits.shape[1],
                                                  labels, group, temperature, with_entropy, chunk_tokens)
        ctx.save_for_backward(logits, labels, *saved)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, log_partition, entropy = ctx.saved_tensors
        num_tokens, vocab_local = logits.shape
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        acc, inv_temp = log_partition.dtype, ctx.inv_temp
        k0, k1, hit = grad_coefficients(grad_logp, grad_entropy, labels, log_partition, entropy, inv_temp)
        index, held = _local_targets(labels, vocab_local, ctx.rank * vocab_local)
        hit = torch.where(held, hit, torch.zeros_like(hit))

        grad = torch.empty_like(logits)
        chunks = list(_chunks(num_tokens, vocab_local, ctx.chunk_tokens, logits.device))
        rows = max((b - a for a, b in chunks), default=0)
        lp_buf = logits.new_empty((rows, vocab_local), dtype=acc)
        p_buf = None if logits.dtype == acc else torch.empty_like(lp_buf)  # else p lives in grad itself
        for a, b in chunks:
            p = grad[a:b] if p_buf is None else p_buf[: b - a]
            logits_grad_(logits[a:b], lp_buf[: b - a], p, log_partition[a:b], k0[a:b],
                         None if k1 is None else k1[a:b], index[a:b], hit[a:b], inv_temp)
            if p_buf is not None:
                grad[a:b].copy_(p)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected-token log-probabilities and entropies, fp32, differentiable w.r.t. ``logits``.

    Args:
        logits: ``[T, V/P]`` this rank's vocabulary shard (P = size of ``group``), any float dtype.
        labels: ``[T]`` long, GLOBAL vocabulary ids already shifted (logits at t predict labels[t]);
            a negative label means "no target" (logp 0, no gradient through logp).
        group: the tensor-parallel process group; ``None`` or a group of one means TP=1 (no collective).
        temperature: the sampling temperature; logits are divided by it.
        chunk_tokens: tokens per chunk (default: chunking.kernel_chunk_tokens for the device).
    Returns:
        ``(logp [T], entropy [T])`` fp32, identical on every rank of ``group``.
    Collectives: forward 2 all-reduces over ``[T]``-sized tensors; backward none.
    """
    return _VocabParallelLogProbEntropy.apply(logits, labels, group, float(temperature), True, chunk_tokens)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Selected-token log-probabilities ``[T]`` fp32 only (cheaper: no entropy partials); see
    :func:`vocab_parallel_logprobs_entropy` for shapes, label convention and collectives."""
    logp, _ = _VocabParallelLogProbEntropy.apply(
        logits, labels, group, float(temperature), False, chunk_tokens
    )
    return logp
