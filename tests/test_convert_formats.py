"""Format (QKV / gate-up merge and split) and distribution (TP split / gather): pure functions, on CPU."""

import pytest
import torch

from trapo_megatron.convert import formats
from trapo_megatron.convert.distribution import Shard, local_shape, merge_gathered, merge_tp, split_for_tp


@pytest.mark.parametrize("heads,groups,head_dim,bias", [(4, 2, 3, False), (4, 2, 3, True), (6, 6, 2, False),
                                                         (8, 1, 2, True)])
def test_qkv_round_trip(heads, groups, head_dim, bias):
    rest = () if bias else (5,)
    q, k, v = (torch.randn(n * head_dim, *rest) for n in (heads, groups, groups))
    fused = formats.merge_qkv(q, k, v, groups)
    assert fused.shape == ((heads + 2 * groups) * head_dim, *rest)
    for got, want in zip(formats.split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(got, want)


def test_qkv_layout_is_grouped_per_query_group():
    # 4 query heads, 2 groups, head_dim 1: rows are [q0, q1, k0, v0, q2, q3, k1, v1].
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])
    assert formats.merge_qkv(q, k, v, 2).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_gate_up_round_trip_and_layout():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = formats.merge_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(formats.split_gate_up(fc1), (gate, up)))


def test_merge_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="num_query_groups"):
        formats.merge_qkv(torch.randn(8, 2), torch.randn(3, 2), torch.randn(3, 2), 2)
    with pytest.raises(ValueError, match="same shape"):
        formats.merge_gate_up(torch.randn(4, 2), torch.randn(6, 2))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("shard", list(Shard))
def test_tp_split_merge_round_trip(shard, tp):
    full = torch.randn(8, 12)
    padded = 12 if shard is Shard.VOCAB else None
    shards = split_for_tp(full, shard, tp, padded_rows=padded)
    assert all(tuple(s.shape) == local_shape(tuple(full.shape), shard, tp, padded) for s in shards)
    rows = 8 if shard is Shard.VOCAB else None
    assert torch.equal(merge_tp(shards, shard, rows=rows), full)
    if shard is not Shard.REPLICATED:
        assert torch.equal(merge_gathered(torch.stack(shards), shard, rows=rows), full)


def test_gated_column_rank_holds_gate_shard_then_up_shard():
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14).view(4, 1)
    shards = split_for_tp(formats.merge_gate_up(gate, up), Shard.GATED_COLUMN, 2)
    assert shards[0].flatten().tolist() == [0, 1, 10, 11]
    assert shards[1].flatten().tolist() == [2, 3, 12, 13]


def test_vocab_padding_is_zero_and_dropped_on_gather():
    full = torch.randn(5, 3)
    shards = split_for_tp(full, Shard.VOCAB, 2, padded_rows=8)
    assert torch.equal(shards[1][1:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="padded vocabulary"):
        split_for_tp(full, Shard.VOCAB, 2, padded_rows=4)
