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
  call and reused chunk after chunk (by default together at most 1/16 of the logits' elements);
- forward uses two all-reduces over ``[T]``-sized vectors (MAX of the local maxima, then SUM of the rescaled
  local partition sums, entropy partials and target logits); backward needs NO collective, because the
  gradient of a rank's shard depends only on that shard and on the per-token global log-partition and
  entropy saved in forward.

This module does not import Megatron: the TP group is a plain ``torch.distributed`` process group, and
``None`` (or a group of one) means TP=1, in which case no collective is issued at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# fp32 elements of one [chunk, V/P] work buffer (two exist at a time), and at most 1/32 of the tokens per
# chunk, so the buffers add at most 1/16 of the logits' element count in fp32. Measured on 2 CPU threads:
# ~55 tokens of a 151,936 vocabulary per chunk cost 2-3x less CPU than the full log_softmax, while chunks of
# a few tokens lose it to per-op thread synchronization; on an accelerator large chunks keep launches few.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "other": 1 << 24}
MAX_CHUNK_FRACTION = 32


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _chunks(num_tokens: int, vocab_local: int, chunk_tokens: int | None, device: torch.device):
    budget = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    if chunk_tokens is None:
        chunk_tokens = max(1, min(budget // max(vocab_local, 1), -(-num_tokens // MAX_CHUNK_FRACTION)))
    for start in range(0, num_tokens, chunk_tokens):
        yield start, min(start + chunk_tokens, num_tokens)


def _local_targets(labels: torch.Tensor, vocab_local: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into this shard clamped to a valid column [T], whether this shard holds the label [T])."""
    local = labels - rank * vocab_local
    held = (local >= 0) & (local < vocab_local) & (labels >= 0)
    return local.clamp(0, vocab_local - 1), held


def _upcast(chunk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``chunk`` itself if it already has the accumulation dtype, else its copy cast into ``buf`` (a
    mixed-dtype op would allocate a hidden cast temporary of the chunk's size)."""
    return chunk if chunk.dtype == buf.dtype else buf.copy_(chunk)


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """logits [T, V/P] (any float dtype), labels [T] long (global ids) -> logp [T], entropy [T] | None,
    in fp32 (fp64 for fp64 logits).

    Forward collectives (on ``group``): all_reduce(MAX) of the per-token local max [T]; all_reduce(SUM) of
    [3, T] (partition sums and entropy partials rescaled to the global max, target logit). Backward: none.
    Labels < 0 mean "no target": their logp is 0 and they get no gradient through logp.
    """

    @staticmethod
    def forward(ctx, logits, labels, group, temperature, with_entropy, chunk_tokens):
        num_tokens, vocab_local = logits.shape
        _, rank = _group_size_rank(group)
        inv_temp = 1.0 / temperature
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits

        # Per-token local statistics, shifted by the LOCAL max m_r:
        # s_r = sum e^(z-m_r), w_r = sum e^(z-m_r)(z-m_r).
        local_max = torch.empty(num_tokens, dtype=acc, device=logits.device)
        sums = torch.zeros(3, num_tokens, dtype=acc, device=logits.device)  # s, w, target logit
        chunks = list(_chunks(num_tokens, vocab_local, chunk_tokens, logits.device))
        rows = max((b - a for a, b in chunks), default=0)
        u_buf = logits.new_empty((rows, vocab_local), dtype=acc)  # the only [C, V/P] work buffers
        e_buf = torch.empty_like(u_buf)
        for a, b in chunks:
            u, e = u_buf[: b - a], e_buf[: b - a]
            m = logits[a:b].amax(dim=-1).to(acc) * inv_temp
            local_max[a:b] = m
            torch.add(-m.unsqueeze(-1), _upcast(logits[a:b], u), alpha=inv_temp, out=u)  # z - m
            torch.exp(u, out=e)
            torch.sum(e, dim=-1, out=sums[0, a:b])
            if with_entropy:  # sum_v e_v u_v as a batched dot product: no [C, V/P] temporary
                sums[1, a:b] = torch.bmm(e.unsqueeze(1), u.unsqueeze(2)).view(-1)
        del u_buf, e_buf

        index, held = _local_targets(labels, vocab_local, rank)
        target = logits.gather(1, index.unsqueeze(-1)).squeeze(-1).to(acc) * inv_temp
        sums[2] = torch.where(held, target, torch.zeros_like(target))

        # Rescale the local partials to the group-wide max M: e^(z-M) = e^(m_r-M) e^(z-m_r).
        global_max = local_max.clone()
        _all_reduce(global_max, dist.ReduceOp.MAX, group)
        shift = local_max - global_max  # <= 0
        scale = torch.exp(shift)
        sums[1] = scale * (sums[1] + shift * sums[0])  # sum e^(z-M)(z-M), uses the unscaled s_r
        sums[0] = scale * sums[0]
        _all_reduce(sums, dist.ReduceOp.SUM, group)

        log_partition = global_max + torch.log(sums[0])  # logZ [T]
        valid = labels >= 0
        logp = torch.where(valid, sums[2] - log_partition, torch.zeros_like(log_partition))
        entropy = torch.log(sums[0]) - sums[1] / sums[0] if with_entropy else None

        ctx.save_for_backward(logits, labels, log_partition, entropy if with_entropy else log_partition)
        ctx.rank, ctx.inv_temp = rank, inv_temp
        ctx.with_entropy, ctx.chunk_tokens = with_entropy, chunk_tokens
        ctx.set_materialize_grads(False)
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
        g_lp = (grad_logp if grad_logp is not None else torch.zeros_like(log_partition)).to(acc)
        g_lp = torch.where(labels >= 0, g_lp, torch.zeros_like(g_lp))
        index, held = _local_targets(labels, vocab_local, ctx.rank)

        # d logp / dz_v = 1[v = label] - p_v ;  d H / dz_v = -p_v (log p_v + H)
        # => dL/dz_v = -p_v (g_lp + g_H (log p_v + H)) + g_lp 1[v = label];  dL/dlogits = dL/dz / temperature.
        # Per row: dL/dlogits_v = p_v (k1 log p_v + k0) + hit 1[v = label] with the per-token constants below.
        k1 = -inv_temp * grad_entropy.to(acc) if grad_entropy is not None else None
        k0 = -inv_temp * (g_lp + grad_entropy.to(acc) * entropy if grad_entropy is not None else g_lp)
        hit = torch.where(held, g_lp * inv_temp, torch.zeros_like(g_lp))

        grad = torch.empty_like(logits)
        chunks = list(_chunks(num_tokens, vocab_local, ctx.chunk_tokens, logits.device))
        rows = max((b - a for a, b in chunks), default=0)
        lp_buf = logits.new_empty((rows, vocab_local), dtype=acc)
        p_buf = None if logits.dtype == acc else torch.empty_like(lp_buf)  # else p lives in grad itself
        for a, b in chunks:
            log_p = lp_buf[: b - a]
            p = grad[a:b] if p_buf is None else p_buf[: b - a]
            torch.add(
                -log_partition[a:b].unsqueeze(-1), _upcast(logits[a:b], log_p), alpha=inv_temp, out=log_p
            )
            torch.exp(log_p, out=p)
            if k1 is not None:
                p.mul_(torch.addcmul(k0[a:b].unsqueeze(-1), log_p, k1[a:b].unsqueeze(-1), out=log_p))
            else:
                p.mul_(k0[a:b].unsqueeze(-1))
            p.scatter_add_(1, index[a:b].unsqueeze(-1), hit[a:b].unsqueeze(-1))
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
        chunk_tokens: tokens per chunk (default: as many as fit ``CHUNK_ELEMENTS`` for the device).
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
