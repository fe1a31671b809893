"""The replica layout: contiguous blocks of engine-TP ranks, every batch position generated exactly once."""

import pytest

from trapo_megatron.rollout.replicas import ReplicaLayout


def test_blocks_are_contiguous_like_vllm_tp_groups():
    layouts = [ReplicaLayout(world_size=8, tensor_parallel_size=4, rank=r) for r in range(8)]
    assert [lay.index for lay in layouts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [lay.leader for lay in layouts] == [0, 0, 0, 0, 4, 4, 4, 4]
    assert list(layouts[5].ranks) == [4, 5, 6, 7]
    assert [lay.is_leader for lay in layouts].count(True) == 2


@pytest.mark.parametrize("world,tp,items", [(4, 1, 16), (4, 2, 16), (8, 4, 10), (2, 2, 3)])
def test_positions_cover_the_batch_once(world, tp, items):
    leaders = [ReplicaLayout(world_size=world, tensor_parallel_size=tp, rank=r) for r in range(0, world, tp)]
    seen = sorted(p for lay in leaders for p in lay.positions(items))
    assert seen == list(range(items))


def test_bad_tp_names_the_knob():
    with pytest.raises(ValueError, match="engine.tensor_parallel_size=3"):
        ReplicaLayout(world_size=4, tensor_parallel_size=3, rank=0)
