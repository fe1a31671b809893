"""Aggregation weights by hand, and the global counts that make them split-independent."""

import pytest
import torch

from trapo_megatron.algo.aggregation import AGGREGATIONS, BatchCounts, token_weights

# 3 sequences: 2 loss tokens, 4 loss tokens, none (e.g. a fully padded row)
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)


def test_drgrpo_constant_normalizer():
    w = token_weights(MASK, "drgrpo", max_response_len=8)
    torch.testing.assert_close(w, MASK.float() / (8 * 3))


def test_token_mean():
    torch.testing.assert_close(token_weights(MASK, "token_mean"), MASK.float() / 6)


def test_seq_mean_skips_empty_sequences():
    w = token_weights(MASK, "seq_mean")
    expected = torch.tensor([[1 / 4, 1 / 4, 0, 0], [1 / 8] * 4, [0] * 4])  # 1 / (len_i * 2 non-empty seqs)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_data_parallel_shards_with_global_counts(mode):
    """Two DP ranks each hold some rows; with the summed counts their weights equal the global ones."""
    full = token_weights(MASK, mode, max_response_len=8)
    shards = (MASK[:1], MASK[1:])
    counts = BatchCounts.from_tensor(sum(BatchCounts.of(s).as_tensor() for s in shards))
    parts = [token_weights(s, mode, max_response_len=8, counts=counts) for s in shards]
    torch.testing.assert_close(torch.cat(parts), full)


def test_all_padding_and_errors():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGGREGATIONS:
        w = token_weights(empty, mode, max_response_len=4)
        assert torch.isfinite(w).all() and (w == 0).all()
    with pytest.raises(ValueError, match="max_response_len"):
        token_weights(MASK, "drgrpo")
    with pytest.raises(ValueError, match="aggregation"):
        token_weights(MASK, "mean")
