"""Engine replicas: the world cut into contiguous blocks of ``engine.tensor_parallel_size`` ranks.

vLLM's external_launcher builds its tensor-parallel groups over the trainer's world as contiguous rank blocks
(vllm/distributed/parallel_state.py, initialize_model_parallel: layout ExternalDP x DP x PP x PCP x TP), so
each block is one independent engine replica. The CPU twin uses the same layout, so both engines run one
topology: every replica generates its own slice of the step's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass


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
