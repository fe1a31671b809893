"""The live weight stream: Hugging Face-named full tensors from a TP/PP-sharded Megatron model, in buckets.

ONE generator serves Hugging Face export, the CPU twin engine and vLLM (``model.load_weights`` takes exactly
these (name, tensor) pairs). Every rank of the model runs it and every rank receives every tensor, so a
colocated engine on any rank can load them.

How bytes move: each TP rank of the pipeline stage that owns a parameter broadcasts its own TP shard over
``pp_group`` (the ranks of one TP rank across stages: between nodes when stages are), then every stage
all-gathers the shards (``all_gather_into_tensor`` on ``tp_group``, within a node; one async op per
parameter, waited per bucket) and merges them into the TP=1 Megatron layout; every rank then splits it into
HF tensors (``formats``). So a rank receives 1/TP of each other stage's bytes across stages (gathering first
and broadcasting full tensors moved TP times that across, the slow fabric) and (TP-1)/TP of the whole model
within its stage (:func:`bytes_per_rank`). At TP=1 and PP=1 nothing moves and most yielded tensors are views
of the parameters (QKV split is the only copy).

Memory: ``bucket_bytes`` bounds what the stream itself allocates at once (gather / receive buffers, gloo's
own flat temporary for an all-gather, the TP-interleave copy and the QKV split copy); a single tensor group
whose cost exceeds a bucket forms its own bucket, so the bound is max(bucket, largest group's cost).
The bound holds when the consumer drops a bucket before asking for the next (vLLM's load_weights does; the
CPU twin collects everything to check names first). Yielded tensors may share memory with the parameters:
consumers copy them and never modify them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron import model_spec
from trapo_megatron.convert import formats, mapping
from trapo_megatron.convert.distribution import Shard, merge_gathered
from trapo_megatron.convert.model_io import LocalParam, detect_spec, local_params

DEFAULT_BUCKET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class _Group:
    """One Megatron tensor (one layer of one entry) as every rank sees it."""

    order: int  # position in mapping.walk order
    owner: int  # pipeline rank holding it
    local_shape: tuple[int, ...]
    dtype: torch.dtype

    def cost(self, entry: mapping.Entry, tp_size: int, pp_size: int, gather_temp: bool) -> int:
        """Bytes the stream allocates at once for this group (see module docstring)."""
        local = torch.Size(self.local_shape).numel() * self.dtype.itemsize
        gathers = tp_size > 1 and entry.shard is not Shard.REPLICATED
        full = local * tp_size if gathers else local
        received = local if pp_size > 1 else 0  # a stage that does not own it receives the TP shard
        gather = full if gathers else 0
        temp = full if gathers and gather_temp else 0  # gloo gathers into its own flat temporary first
        interleave = full if gathers and entry.shard in (Shard.ROW, Shard.GATED_COLUMN) else 0
        split = full if entry.fmt is formats.Format.QKV else 0
        return received + gather + temp + interleave + split


def _rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def _plan(
    params: list[LocalParam], walk: list[tuple[mapping.Entry, int | None]], position: dict,
    pp_group: dist.ProcessGroup | None,
) -> list[_Group]:
    """Every rank's groups in walk order (one all_gather_object over the pipeline group)."""
    pp_rank, pp_size = _rank(pp_group)
    mine = [(position[(p.entry.mcore, p.layer)], pp_rank, tuple(p.param.shape), p.param.dtype)
            for p in params if not p.tied_copy]
    every = [mine]
    if pp_size > 1:
        every = [None] * pp_size
        dist.all_gather_object(every, mine, group=pp_group)
    groups = sorted((_Group(*g) for stage in every for g in stage), key=lambda g: g.order)
    missing = set(range(len(walk))) - {g.order for g in groups}
    if missing:
        names = [walk[i][0].mcore.replace(mapping.LAYER, str(walk[i][1])) for i in sorted(missing)[:5]]
        raise ValueError(f"the model lacks {len(missing)} mapped tensors on every stage, e.g. {names}")
    return groups


def _buckets(groups: list[_Group], walk, tp_size: int, pp_size: int, bucket_bytes: int,
             gather_temp: bool) -> list[list[_Group]]:
    """Consecutive groups of one owner whose costs sum to at most ``bucket_bytes``."""
    buckets: list[list[_Group]] = []
    used = 0
    for g in groups:
        cost = g.cost(walk[g.order][0], tp_size, pp_size, gather_temp)
        if not buckets or buckets[-1][0].owner != g.owner or used + cost > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(g)
        used += cost
    return buckets


def iter_hf_buckets(
    model_chunks: list[Any],
    hf_config: Any,
    *,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor) covering the whole model once, on every rank of the model.

    ``hf_config``: config dict / PretrainedConfig / HF directory / ModelSpec. ``tp_group`` / ``pp_group``:
    the model's tensor- and pipeline-parallel groups (None: size 1). ``dtype``: cast on the way out (e.g.
    the engine's bf16). Collective: every rank of the TP and PP groups must iterate to the end.
    """
    dims = model_spec.from_hf_config(hf_config)
    params = local_params(model_chunks, dims)
    walk = list(mapping.walk(dims, detect_spec(p.entry.mcore for p in params)))
    position = {(e.mcore, layer): i for i, (e, layer) in enumerate(walk)}
    _, tp_size = _rank(tp_group)
    pp_rank, pp_size = _rank(pp_group)
    by_order = {position[(p.entry.mcore, p.layer)]: p for p in params if not p.tied_copy}
    groups = _plan(params, walk, position, pp_group)
    device = params[0].param.device if params else torch.device("cpu")
    gather_temp = tp_size > 1 and dist.get_backend(tp_group) == "gloo"
    for bucket in _buckets(groups, walk, tp_size, pp_size, bucket_bytes, gather_temp):
        if bucket[0].owner == pp_rank:
            shards = [by_order[g.order].param.detach() for g in bucket]
        else:
            shards = [torch.empty(g.local_shape, dtype=g.dtype, device=device) for g in bucket]
        if pp_size > 1:
            works = [dist.broadcast(t, group=pp_group, group_src=bucket[0].owner, async_op=True) for t in shards]
            for work in works:
                work.wait()
        fulls = _tp_full(shards, [walk[g.order][0].shard for g in bucket], tp_group, tp_size)
        del shards
        out = []
        for g, full in zip(bucket, fulls):
            entry, layer = walk[g.order]
            concrete = entry if layer is None else entry.at_layer(layer)
            if entry.shard is Shard.VOCAB:
                full = full[: dims.vocab_size]
            for name, tensor in zip(concrete.hf, formats.split(entry.fmt, full, dims.heads)):
                out.append((name, tensor if dtype is None else tensor.to(dtype)))
        del fulls
        yield out


def _tp_full(shards: list[torch.Tensor], kinds: list[Shard], tp_group: dist.ProcessGroup | None,
             tp_size: int) -> list[torch.Tensor]:
    """The TP=1 layout of each TP shard (of kind ``kinds[i]``): itself when not split, else an all-gather
    (async, one per tensor, all in flight together) merged as ``distribution`` says."""
    gathered: list[torch.Tensor | None] = []
    works = []
    for local, kind in zip(shards, kinds, strict=True):
        if tp_size == 1 or kind is Shard.REPLICATED:
            gathered.append(None)
            continue
        buf = torch.empty((tp_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        works.append(dist.all_gather_into_tensor(buf, local.contiguous(), group=tp_group, async_op=True))
        gathered.append(buf.view(tp_size, *local.shape))
    for work in works:
        work.wait()
    return [local if buf is None else merge_gathered(buf, kind) for local, kind, buf in zip(shards, kinds, gathered)]


def bytes_per_rank(dims: model_spec.ModelSpec, tp_size: int, pp_size: int, pp_rank: int, itemsize: int) -> dict[str, int]:
    """Bytes one rank of stage ``pp_rank`` receives in one pass of the stream, layers split evenly over the
    stages (the embedding on the first, final norm and output on the last; vocab unpadded): ``across_stages``
    over ``pp_group`` (another stage's TP shard of each tensor), ``within_stage`` over ``tp_group`` (the
    other TP ranks' shards of every tensor)."""
    per_stage = dims.num_layers // pp_size
    across = within = 0
    for entry, layer in mapping.walk(dims):
        owner = (layer // per_stage if layer is not None
                 else pp_size - 1 if entry.mcore.startswith(("decoder.final", "output")) else 0)
        full = torch.Size(mapping.mcore_shape(entry, dims)).numel() * itemsize
        shard = full if entry.shard is Shard.REPLICATED else full // tp_size
        across += shard if owner != pp_rank else 0
        within += full - shard
    return {"across_stages": across, "within_stage": within}


def iter_hf_weights(model_chunks: list[Any], hf_config: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) pairs of :func:`iter_hf_buckets`, flattened (same arguments)."""
    for bucket in iter_hf_buckets(model_chunks, hf_config, **kwargs):
        yield from bucket
