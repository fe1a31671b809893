"""The official run's micro-batches, rebuilt from sequence lengths alone, and the entropy weights they imply.

The official actor (Su-my/TRAPO @982cb8f, verl 0.2 fork) takes the entropy bonus as a token MEAN over all
response tokens of each micro-batch, so its weight depends on how verl cut the step's batch:

1. trainer/ppo/ray_trainer.py:675-686 ``_balance_batch``: Karmarkar-Karp over the lengths (prompt + response
   tokens, the attention-mask sums) into ``world_size`` equal-count rank shares, each sorted by batch index.
2. utils/seqlen_balancing.py ``rearrange_micro_batches``: each rank splits its share into
   ``ceil(tokens / max_tokens)`` micro-batches (the max over ranks; ``max_tokens`` = ppo_max_token_len_per_gpu,
   32,768 in the official script), again by Karmarkar-Karp, without the equal-count constraint.

Karmarkar-Karp is reproduced with verl's tie-breaking (same heap order, same set order), so equal lengths go
where verl puts them; the batch order is ours (prompt-major, samples in micro-group order).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field


@dataclass
class _Part:
    """One partition under construction: its sum and its (index, length) items in insertion order."""

    total: int = 0
    items: list[tuple[int, int]] = field(default_factory=list)

    def key(self) -> tuple[int, int, list[tuple[int, int]]]:
        """verl's set order: by sum, then item count, then the items themselves."""
        return self.total, len(self.items), self.items


class _State:
    """k partitions, kept largest first; the heap pops the largest spread first (then the largest top set)."""

    def __init__(self, items: list[tuple[int, int]], k: int) -> None:
        self.parts = [_Part() for _ in range(k)]
        for part, (idx, length) in zip(self.parts, items, strict=False):
            part.total, part.items = length, [(idx, length)]
        self._sort()

    def _sort(self) -> None:
        self.parts.sort(key=_Part.key, reverse=True)  # stable, as verl's sorted(reverse=True)

    @property
    def spread(self) -> int:
        return self.parts[0].total - self.parts[-1].total

    def absorb(self, other: _State) -> None:
        """Largest with smallest: the differencing step."""
        for mine, theirs in zip(self.parts, reversed(other.parts), strict=True):
            mine.items.extend(theirs.items)
            mine.total += theirs.total
        self._sort()

    def __lt__(self, other: _State) -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.parts[0].key() > other.parts[0].key()


def karmarkar_karp(lengths: list[int], k: int, equal_size: bool) -> list[list[int]]:
    """Indices of ``lengths`` in ``k`` partitions of balanced sums (each sorted), as verl's
    ``get_seqlen_balanced_partitions``; ``equal_size``: every partition holds len / k items."""
    if len(lengths) < k:
        raise ValueError(f"cannot split {len(lengths)} sequences into {k} non-empty partitions")
    if equal_size and len(lengths) % k:
        raise ValueError(f"{len(lengths)} sequences do not split evenly over {k} ranks")
    ordered = sorted((length, i) for i, length in enumerate(lengths))
    step = k if equal_size else 1
    heap: list[_State] = []
    for start in range(0, len(ordered), step):
        heapq.heappush(heap, _State([(i, length) for length, i in ordered[start:start + step]], k))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.absorb(second)
        heapq.heappush(heap, first)
    return [sorted(i for i, _ in part.items) for part in heap[0].parts]


def official_micro_batches(lengths: list[int], world_size: int, max_tokens: int) -> list[list[list[int]]]:
    """Per reference rank, its micro-batches as lists of batch indices (lengths: prompt + response tokens)."""
    if max(lengths, default=0) > max_tokens:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the {max_tokens}-token official "
                         "micro-batch (loss.entropy_micro_batch_tokens)")
    if not lengths or len(lengths) % world_size:
        raise ValueError(f"the step's {len(lengths)} sequences do not split evenly over the reference run's "
                         f"{world_size} ranks (loss.reference_world_size)")
    ranks = karmarkar_karp(lengths, world_size, equal_size=True)
    count = max(math.ceil(sum(lengths[i] for i in share) / max_tokens) for share in ranks)
    out = []
    for share in ranks:
        local = karmarkar_karp([lengths[i] for i in share], count, equal_size=False)
        out.append([[share[j] for j in mb] for mb in local])
    return out


def official_entropy_scales(lengths: list[int], response_lens: list[int], world_size: int,
                            max_tokens: int) -> list[float]:
    """Per sequence, ``1 / (world_size * response tokens of its official micro-batch)``: the weight of each of
    its response tokens. The official bonus (``mean over ranks of sum over micro-batches of the token mean``,
    mix_actor.py:211,235) as a sum over tokens, so any micro-batching of ours gives it exactly."""
    scales = [0.0] * len(lengths)
    for rank in official_micro_batches(lengths, world_size, max_tokens):
        for mb in rank:
            tokens = sum(response_lens[i] for i in mb)
            for i in mb:
                scales[i] = 1.0 / (world_size * max(tokens, 1))
    return scales
