"""Aggregation weights by hand, and the global counts that make them split-independent."""

import math

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


def test_fsdp_sum_is_the_padded_width_times_the_reference_world():
    w = token_weights(MASK, "fsdp_sum", max_response_len=8, reference_world_size=4)
    torch.testing.assert_close(w, MASK.float() / (8 * 4))  # whatever the number of sequences
    with pytest.raises(ValueError, match="fsdp_sum.*max_response_len"):
        token_weights(MASK, "fsdp_sum")
    with pytest.raises(ValueError, match="reference_world_size"):
        token_weights(MASK, "fsdp_sum", max_response_len=8, reference_world_size=0)


def test_fsdp_sum_loss_and_gradient_equal_the_official_rank_mean_by_hand():
    """The official actor on 2 ranks of 2 rows, response width 4: each rank's loss is the sum of its
    per-token losses / 4, and FSDP averages the ranks' gradients. Our loss over 3 micro-batches cut
    differently must give the same value and, per token, the hand gradient d/dlogp = -(A or p / max(p, alpha)) / 8."""
    from trapo_megatron.algo.loss import LossConfig, trapo_loss_from_logprobs

    p = torch.tensor([[0.5, 0.05, 0.9, 0.3], [0.2, 0.6, 0.7, 0.0], [0.4, 0.8, 0.0, 0.0], [0.3, 0.5, 0.6, 0.1]])
    sft = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    rl = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.0, 0.25, 2.0])[:, None].expand(-1, 4)
    cfg = LossConfig(aggregation="fsdp_sum", reference_world_size=2)
    weight = token_weights(sft | rl, "fsdp_sum", max_response_len=4, reference_world_size=2)
    logp = p.clamp(min=1e-3).log().double().requires_grad_()

    total = 0.0
    for rows in ([0], [1, 2], [3]):  # our micro-batches: not the official ranks' rows {0, 1}, {2, 3}
        batch = {"labels": torch.zeros(4 * len(rows), dtype=torch.long), "sft_mask": sft[rows].reshape(-1),
                 "rl_mask": rl[rows].reshape(-1), "advantages": adv[rows].reshape(-1),
                 "token_weight": weight[rows].reshape(-1)}
        loss, _ = trapo_loss_from_logprobs(logp[rows].reshape(-1), torch.zeros(4 * len(rows)), batch, cfg)
        total = total + loss
    total.backward()

    alpha = cfg.trsft_alpha
    # TrSFT's value is the potential of the official surrogate -p / clamp(p.detach(), alpha): same gradient
    trsft_value = torch.where(p >= alpha, -p.log(), 1 - math.log(alpha) - p / alpha)
    per_token = torch.where(sft, trsft_value, torch.where(rl, -adv, torch.zeros(())))  # ratio 1 on-policy
    official = sum(per_token[rows].sum() / 4 for rows in ([0, 1], [2, 3])) / 2
    torch.testing.assert_close(total.detach().float(), official)
    hand_grad = torch.where(sft, -(p / p.clamp(min=alpha)), torch.where(rl, -adv, torch.zeros(()))) / 8
    torch.testing.assert_close(logp.grad.float(), hand_grad)
