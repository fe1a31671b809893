"""Engine replicas: the world cut into contiguous blocks of ``engine.tensor_parallel_size`` ranks.

vLLM's external_launcher builds its tensor-parallel groups over the trainer's world as contiguous rank blocks
(vllm/distributed/parallel_state.py, initialize_model_parallel: layout ExternalDP x DP x PP x PCP x TP), so
each block is one independent engine replica. The CPU twin uses the same layout, so both engines run one
topology: every replica generates its own slice of the step's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ReplicaLayout:
    """Which replica this rank belongs to, for a world of ``world_size`` ranks and engine TP ``tensor_parallel_size``.

    Example: world 4, engine TP 2 -> replicas {0, 1} and {2, 3}; rank 3 is in replica 1, whose leader is 2.
    """

    world_size: int
    tensor_parallel_size: int
    rank: int

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if tp < 1 or self.world_size % tp:
            raise ValueError(f"engine.tensor_parallel_size={tp} must divide the world size {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def index(self) -> int:
        """This rank's replica."""
        return self.rank // self.tensor_parallel_size

    @property
    def leader(self) -> int:
        """Global rank of the replica's first rank (it grades and broadcasts the replica's rewards)."""
        return self.index * self.tensor_parallel_size

    @property
    def ranks(self) -> range:
        return range(self.leader, self.leader + self.tensor_parallel_size)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def positions(self, num_items: int) -> range:
        """The positions (of ``num_items`` in the step's batch) this replica generates: strided, so every
        replica gets an equal share and the assignment depends only on the batch, never on timing."""
        return range(self.index, num_items, self.num_replicas)


def new_replica_group(layout: ReplicaLayout) -> Any:
    """This rank's replica as a gloo group (None for one-rank replicas), for the host-side hand-overs inside a
    replica (rewards, the CPU twin's outputs). Collective: every rank of the world calls it, in the same order
    (``new_group`` is collective over the world even for the ranks it leaves out)."""
    if layout.tensor_parallel_size == 1:
        return None
    mine = None
    for index in range(layout.num_replicas):
        first = index * layout.tensor_parallel_size
        group = dist.new_group(list(range(first, first + layout.tensor_parallel_size)), backend="gloo")
        if index == layout.index:
            mine = group
    return mine


def broadcast_from_leader(obj: Any, layout: ReplicaLayout, group: Any) -> Any:
    """The leader's ``obj`` on every rank of the replica (others pass anything, e.g. None)."""
    if layout.tensor_parallel_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=layout.leader, group=group)
    return box[0]
