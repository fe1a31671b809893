"""The hand-over: each data-parallel rank receives only its share of the step's rollouts, as flat tensors.

Replica r's leader holds the graded groups of batch positions r, r + R, ... (R replicas); data-parallel rank d
trains positions d, d + D, ... (D ranks). So each leader sends every world rank the groups in the intersection
of the two, as one int32 payload per (leader, rank) pair over the gloo host group (point-to-point: a size,
then the payload; nothing when the intersection is empty), and every rank puts its parts back in batch-
position order. What the step needs as a whole (the aggregation counts, the sums behind the metrics, the wave
counts) is one SUM all-reduce of the leaders' per-replica sums; the slowest replica's seconds one MAX.

So what a rank receives and allocates grows with its share, not with the world: gathering every replica's
rollouts as Python objects to every rank (what this replaced) moved, unpickled and built the whole step on
every rank, about 1.7 GB per rank per step at 32B (512 prompts x 8 samples, 8k tokens, 32 ranks). A leader
sends each share once per rank that trains it (the TP x PP ranks of a data-parallel rank).
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron.algo.advantages import reward_stats
from trapo_megatron.algo.aggregation import BatchCounts
from trapo_megatron.rollout.replicas import ReplicaLayout
from trapo_megatron.rollout.waves import Rollout, WaveStats

_COLUMNS = ("prompt_lens", "prefix_lens", "continuation_lens", "num_logprobs", "sft_on_prefix")
"""Per-sample int columns of the wire format, in order."""


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop (sample indices of
    groups)."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    first = torch.repeat_interleave(starts - _exclusive_cumsum(lengths), lengths)
    return first + torch.arange(total)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _segments(flat: torch.Tensor, lengths: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """The segments ``samples`` of ``flat`` (cut back to back by ``lengths``), concatenated in that order."""
    starts, sizes = _exclusive_cumsum(lengths)[samples].tolist(), lengths[samples].tolist()
    return torch.cat([flat[a:a + n] for a, n in zip(starts, sizes, strict=True)]) if sizes else flat[:0]


def _flat(lists: Iterable[list], typecode: str, dtype: torch.dtype) -> torch.Tensor:
    """Python lists of numbers back to back as one tensor, through a C array ("i": 32-bit int, "f": float32;
    ~3x faster than one big list; floats round to float32 as ``torch.tensor`` rounds them)."""
    buf = array.array(typecode)
    for values in lists:
        buf.extend(values)
    return torch.frombuffer(buf, dtype=dtype).clone() if len(buf) else torch.zeros(0, dtype=dtype)


@dataclass
class Sample:
    """One sample of a :class:`Samples`: views into its flat tensors."""

    tokens: torch.Tensor
    """prompt + prefix + continuation, int32 [prompt_len + prefix_len + continuation_len]."""
    prompt_len: int
    prefix_len: int
    logprobs: torch.Tensor
    """float32: the engine's log-probs of the first len(logprobs) continuation tokens."""
    sft_on_prefix: bool


@dataclass
class Samples:
    """Groups of rollouts as flat tensors: what training needs of them, groups in batch-position order.

    Per group [P]: ``positions``, ``group_sizes``. Per sample [N], in group then sample order:
    ``prompt_lens``, ``prefix_lens``, ``continuation_lens``, ``num_logprobs`` (long), ``sft_on_prefix`` (bool),
    ``rewards`` (float32, the values ``torch.tensor(rewards)`` gives). Flat: ``tokens`` (int32, each sample's
    prompt + prefix + continuation back to back), ``logprobs`` (float32, each sample's continuation log-probs).

    Example: position 5 with two samples, prompt [1, 2], the second guided by prefix [7] and SFT-carrying:
        positions [5], group_sizes [2], prompt_lens [2, 2], prefix_lens [0, 1], continuation_lens [2, 1],
        num_logprobs [2, 1], sft_on_prefix [F, T], tokens [1, 2, 8, 0, 1, 2, 7, 0], logprobs [-.1, -.4, -.2]
    """

    positions: torch.Tensor
    group_sizes: torch.Tensor
    prompt_lens: torch.Tensor
    prefix_lens: torch.Tensor
    continuation_lens: torch.Tensor
    num_logprobs: torch.Tensor
    sft_on_prefix: torch.Tensor
    rewards: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def from_rollouts(cls, groups: Sequence[Sequence[Rollout]], positions: Sequence[int]) -> Samples:
        flat = [r for g in groups for r in g]

        def column(values: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(list(values), dtype=dtype)

        return cls(
            positions=column(positions, torch.long), group_sizes=column(map(len, groups), torch.long),
            prompt_lens=column((len(r.prompt_ids) for r in flat), torch.long),
            prefix_lens=column((len(r.prefix_ids) for r in flat), torch.long),
            continuation_lens=column((len(r.continuation_ids) for r in flat), torch.long),
            num_logprobs=column((len(r.continuation_logprobs) for r in flat), torch.long),
            sft_on_prefix=column((r.sft_on_prefix for r in flat), torch.bool),
            rewards=column((r.reward for r in flat), torch.float32),
            tokens=_flat((x for r in flat for x in (r.prompt_ids, r.prefix_ids, r.continuation_ids)), "i", torch.int32),
            logprobs=_flat((r.continuation_logprobs for r in flat), "f", torch.float32),
        )

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per sample [N]."""
        return self.prompt_lens + self.prefix_lens + self.continuation_lens

    @property
    def group_ids(self) -> torch.Tensor:
        """Each sample's group (its index in this object) [N]."""
        return torch.repeat_interleave(torch.arange(len(self.positions)), self.group_sizes)

    def __iter__(self) -> Iterator[Sample]:
        """The samples in order."""
        cols = zip(_exclusive_cumsum(self.lengths).tolist(), self.lengths.tolist(),
                   _exclusive_cumsum(self.num_logprobs).tolist(), self.num_logprobs.tolist(),
                   self.prompt_lens.tolist(), self.prefix_lens.tolist(), self.sft_on_prefix.tolist(), strict=True)
        for t, n, lp, m, prompt, prefix, sft in cols:
            yield Sample(tokens=self.tokens[t:t + n], prompt_len=prompt, prefix_len=prefix,
                         logprobs=self.logprobs[lp:lp + m], sft_on_prefix=sft)

    def take(self, groups: torch.Tensor) -> Samples:
        """The groups at indices ``groups`` (any order, e.g. a sort by position)."""
        sizes = self.group_sizes[groups]
        samples = _ranges(_exclusive_cumsum(self.group_sizes)[groups], sizes)
        return Samples(
            positions=self.positions[groups], group_sizes=sizes,
            **{k: getattr(self, k)[samples] for k in (*_COLUMNS, "rewards")},
            tokens=_segments(self.tokens, self.lengths, samples),
            logprobs=_segments(self.logprobs, self.num_logprobs, samples),
        )

    @classmethod
    def cat(cls, parts: Sequence[Samples]) -> Samples:
        """Parts with disjoint positions -> one, groups sorted by position."""
        joined = cls(**{k: torch.cat([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})
        return joined.take(torch.argsort(joined.positions))

    # ------------------------------------------------------------------------------------ wire format
    def to_wire(self) -> torch.Tensor:
        """One int32 tensor: [P, N, T, num log-probs], positions, group sizes, the int columns, the rewards'
        and log-probs' float32 bits, the tokens."""
        sizes = torch.tensor([len(self.positions), len(self.rewards), len(self.tokens), len(self.logprobs)],
                             dtype=torch.int32)
        return torch.cat([sizes, self.positions.int(), self.group_sizes.int(),
                          *(getattr(self, k).int() for k in _COLUMNS), self.rewards.view(torch.int32),
                          self.logprobs.view(torch.int32), self.tokens])

    @classmethod
    def from_wire(cls, wire: torch.Tensor) -> Samples:
        p, n, t, lp = wire[:4].tolist()
        pieces = iter(torch.split(wire[4:], [p, p, *([n] * len(_COLUMNS)), n, lp, t]))
        out = {"positions": next(pieces).long(), "group_sizes": next(pieces).long()}
        out.update({k: next(pieces).long() for k in _COLUMNS})
        out["sft_on_prefix"] = out["sft_on_prefix"].bool()
        out.update(rewards=next(pieces).view(torch.float32), logprobs=next(pieces).view(torch.float32),
                   tokens=next(pieces))
        return cls(**out)


def num_loss_tokens(s: Samples) -> torch.Tensor:
    """Loss positions per sample [N], as ``algo.masks.loss_masks`` marks them: position t is one when token
    t+1 is a continuation token, or a prefix token of an SFT-carrying sample; token 0 is nobody's target."""
    prefix_targets = s.prefix_lens - ((s.prompt_lens == 0) & (s.prefix_lens > 0)).long()
    continuation_targets = s.continuation_lens - ((s.prompt_lens + s.prefix_lens == 0) & (s.continuation_lens > 0)).long()
    return torch.where(s.sft_on_prefix, prefix_targets, 0) + continuation_targets


@dataclass(frozen=True)
class StepTotals:
    """Sums over the whole step's samples (every rank holds them after the hand-over's all-reduce)."""

    counts: BatchCounts
    """The aggregation's global counts (float32, as the token weights use them)."""
    num_samples: float
    num_prompts: float
    num_tokens: float
    """Tokens of every sample (prompt + prefix + continuation)."""
    num_unguided: float
    reward_sum_unguided: float
    response_len_sum_unguided: float
    """prefix + continuation tokens, over unguided samples."""


def batch_counts(s: Samples) -> BatchCounts:
    """The aggregation's counts over ``s`` (float32)."""
    loss = num_loss_tokens(s)
    return BatchCounts.from_tensor(torch.tensor([len(loss), int(loss.sum()), int((loss > 0).sum())],
                                                dtype=torch.float32))


def _local_sums(s: Samples, guided: torch.Tensor) -> list[float]:
    """The sums of :class:`StepTotals` over ``s`` (float64: exact for integer counts and dyadic rewards)."""
    unguided = reward_stats(s.rewards.double(), guided, s.prefix_lens + s.continuation_lens)
    return [*batch_counts(s).as_tensor().tolist(), float(len(s.positions)), float(s.lengths.sum()),
            *(float(unguided[k]) for k in ("num_unguided", "reward_sum", "response_len_sum"))]


_NUM_SUMS = 8
"""Length of :func:`_local_sums`."""


def reduce_step(mine: Samples | None, guided: torch.Tensor | None, stats: WaveStats, group: Any) -> tuple[StepTotals, WaveStats]:
    """The step's totals and wave stats from the replica leaders' (``mine`` and ``guided`` [N] on a leader,
    None elsewhere; ``stats``: this rank's, every rank ran the waves): one SUM and one MAX all-reduce."""
    num_mg = len(stats.guided_prompts)
    sums = torch.zeros(_NUM_SUMS + 3 + num_mg, dtype=torch.float64)
    seconds = torch.zeros(2, dtype=torch.float64)
    if mine is not None:
        sums[:_NUM_SUMS] = torch.tensor(_local_sums(mine, guided), dtype=torch.float64)
        sums[_NUM_SUMS:] = torch.tensor([stats.num_engine_calls, stats.num_generated, stats.num_expert_only,
                                 *stats.guided_prompts], dtype=torch.float64)
        seconds[:] = torch.tensor([stats.generate_seconds, stats.score_seconds], dtype=torch.float64)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
    v = sums.tolist()
    totals = StepTotals(counts=BatchCounts.from_tensor(sums[:3].float()), num_samples=v[0], num_prompts=v[3],
                        num_tokens=v[4], num_unguided=v[5], reward_sum_unguided=v[6], response_len_sum_unguided=v[7])
    calls, generated, expert_only, *guided_prompts = (int(x) for x in v[_NUM_SUMS:])
    waves = WaveStats(num_engine_calls=calls, num_generated=generated, num_expert_only=expert_only,
                      guided_prompts=guided_prompts, generate_seconds=seconds[0].item(), score_seconds=seconds[1].item())
    return totals, waves


@dataclass
class StepLengths:
    """Every sample of the step in batch order (position-major, then sample order): the official entropy
    mode's micro-batches are built from the whole step's lengths (algo/official_micro_batches.py), so each
    rank needs them, two ints a sample, not the samples themselves."""

    offsets: torch.Tensor
    """[positions + 1] index of each batch position's first sample."""
    lengths: torch.Tensor
    """[N] prompt + prefix + continuation tokens."""
    response_lens: torch.Tensor
    """[N] prefix + continuation tokens."""

    @classmethod
    def of_step(cls, step: Samples) -> StepLengths:
        """From ``step`` holding the whole step's groups in batch order (one process, tests)."""
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(step.group_sizes, 0)])
        return cls(offsets=offsets, lengths=step.lengths, response_lens=step.prefix_lens + step.continuation_lens)

    def indices_of(self, share: Samples) -> torch.Tensor:
        """Step-wide sample indices of ``share``'s samples, in its order."""
        return _ranges(self.offsets[share.positions], share.group_sizes)


def step_lengths(mine: Samples | None, num_items: int, group: Any) -> StepLengths:
    """:class:`StepLengths` from the replica leaders' groups (``mine``; None off a leader): two SUM
    all-reduces of int64 host tensors, each position filled by exactly one leader."""
    sizes = torch.zeros(num_items, dtype=torch.long)
    if mine is not None:
        sizes[mine.positions] = mine.group_sizes
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sizes, group=group)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
    per = torch.zeros(2, int(offsets[-1]), dtype=torch.long)
    if mine is not None:
        index = _ranges(offsets[mine.positions], mine.group_sizes)
        per[0, index] = mine.lengths
        per[1, index] = mine.prefix_lens + mine.continuation_lens
    if dist.get_world_size(group) > 1:
        dist.all_reduce(per, group=group)
    return StepLengths(offsets=offsets, lengths=per[0], response_lens=per[1])


def exchange(mine: Samples | None, num_items: int, layout: ReplicaLayout, dp_ranks: Sequence[int], dp_size: int,
             group: Any) -> Samples:
    """This rank's data-parallel share of the step (batch positions ``dp_ranks[rank] + k * dp_size``).

    ``mine``: on a replica leader, its replica's groups; None elsewhere. ``dp_ranks``: every world rank's
    data-parallel rank. Point-to-point over ``group`` (gloo, the whole world): sizes first, then payloads."""
    rank, replicas = layout.rank, layout.num_replicas

    def wanted(replica: int, dest: int) -> list[int]:
        return [p for p in range(replica, num_items, replicas) if p % dp_size == dp_ranks[dest]]

    outgoing: dict[int, torch.Tensor] = {}
    parts: list[Samples] = []
    if mine is not None:
        for dest in range(layout.world_size):
            positions = wanted(layout.index, dest)
            if positions:
                share = mine.take(torch.nonzero(torch.isin(mine.positions, torch.tensor(positions))).flatten())
                if dest == rank:
                    parts.append(share)
                else:
                    outgoing[dest] = share.to_wire()
    sources = [r * layout.tensor_parallel_size for r in range(replicas)]
    sources = [src for r, src in enumerate(sources) if src != rank and wanted(r, rank)]
    sizes = {src: torch.zeros(1, dtype=torch.long) for src in sources}
    _p2p({d: torch.tensor([len(w)], dtype=torch.long) for d, w in outgoing.items()}, sizes, group)
    incoming = {src: torch.empty(int(sizes[src]), dtype=torch.int32) for src in sources}
    _p2p(outgoing, incoming, group)
    parts += [Samples.from_wire(incoming[src]) for src in sources]
    return Samples.cat(parts)


def _p2p(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group: Any) -> None:
    """Post every send and receive (peer rank -> tensor) at once, then wait for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer, group) for peer, t in sends.items()]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for peer, t in recvs.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
