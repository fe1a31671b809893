"""The official run's micro-batches rebuilt from lengths (Karmarkar-Karp worked by hand, with verl's
tie-breaking), and the official entropy bonus: the mean over reference ranks of the sum over their
micro-batches of the token mean of the entropy over ALL response tokens."""

from __future__ import annotations

import pytest
import torch

from trapo_megatron.algo.aggregation import BatchCounts
from trapo_megatron.algo.loss import LossConfig, trapo_loss_from_logprobs
from trapo_megatron.algo.official_micro_batches import karmarkar_karp, official_micro_batches
from trapo_megatron.rollout.handover import Samples, StepLengths, batch_counts
from trapo_megatron.rollout.waves import Rollout
from trapo_megatron.train import batch as batching

LENGTHS = [5, 9, 3, 7, 2, 6]
# By hand (largest differencing, verl's heap order): ranks {2, 3, 5} and {0, 1, 4} (16 tokens each, the tie
# at the last merge decided by the item lists); ceil(16 / 10) = 2 micro-batches per rank: [3, 7, 6] ->
# {3, 6} and {7}, [5, 9, 2] -> {9} and {5, 2}.
OFFICIAL = [[[2, 5], [3]], [[1], [0, 4]]]


def test_micro_batches_by_hand() -> None:
    assert karmarkar_karp(LENGTHS, 2, equal_size=True) == [[2, 3, 5], [0, 1, 4]]
    assert official_micro_batches(LENGTHS, 2, 10) == OFFICIAL
    assert official_micro_batches(LENGTHS, 2, 100) == [[[2, 3, 5]], [[0, 1, 4]]]
    with pytest.raises(ValueError, match="reference_world_size"):
        official_micro_batches(LENGTHS, 4, 10)
    with pytest.raises(ValueError, match="entropy_micro_batch_tokens"):
        official_micro_batches(LENGTHS, 2, 8)


def _rollouts() -> list[Rollout]:
    """Six samples of the lengths above; sample 1 and 4 are guided, 1's prefix without SFT (MG2 de-dup)."""
    prompts = [2, 3, 1, 2, 1, 2]
    prefix = {1: 3, 4: 1}
    out = []
    for i, (length, p) in enumerate(zip(LENGTHS, prompts, strict=True)):
        k = prefix.get(i, 0)
        out.append(Rollout(example_index=i // 3, sample_index=i % 3, micro_group=0, guided=k > 0, ratio=0.0,
                           prompt_ids=[3] * p, prefix_ids=[4] * k, continuation_ids=[5] * (length - p - k),
                           continuation_logprobs=[-1.0] * (length - p - k), sft_on_prefix=i == 4,
                           reward=float(i % 2)))
    return out


def test_official_entropy_equals_the_per_micro_batch_token_mean() -> None:
    cfg = LossConfig(entropy_coef=0.01, entropy_mode="official", reference_world_size=2,
                     entropy_micro_batch_tokens=10, aggregation="fsdp_sum")
    rollouts = _rollouts()
    step = Samples.from_rollouts([rollouts[:3], rollouts[3:]], [0, 1])
    seqs = batching.sequences(step, cfg, 8, batch_counts(step), StepLengths.of_step(step))
    share = step.take(torch.tensor([1]))  # a data-parallel rank's share (position 1): the same weights
    for s, t in zip(batching.sequences(share, cfg, 8, batch_counts(step), StepLengths.of_step(step)), seqs[3:],
                    strict=True):
        assert torch.equal(s.entropy_weight, t.entropy_weight)
    g = torch.Generator().manual_seed(0)
    entropy = [torch.rand(len(s.tokens), generator=g, dtype=torch.float64).requires_grad_() for s in seqs]

    # The official term, directly: response tokens of sample i are its last len - prompt tokens, predicted
    # at positions prompt - 1 .. len - 2.
    def response_entropy(i: int) -> torch.Tensor:
        return entropy[i][len(rollouts[i].prompt_ids) - 1:-1]

    official = sum(-cfg.entropy_coef * torch.cat([response_entropy(i) for i in mb]).mean()
                   for rank in OFFICIAL for mb in rank) / 2
    official_grad = torch.autograd.grad(official, entropy)

    ours = 0.0
    for mb_seqs in ([0, 1, 2], [3], [4, 5]):  # our micro-batches: not the official ones
        mb = {k: torch.cat([getattr(seqs[i], k) for i in mb_seqs]) for k in batching.PER_TOKEN_KEYS}
        ent = torch.cat([entropy[i] for i in mb_seqs])
        loss, metrics = trapo_loss_from_logprobs(torch.zeros(len(ent), dtype=torch.float64), ent, mb, cfg)
        ours = ours + metrics["entropy_loss"]
        loss.backward()
    torch.testing.assert_close(ours, official.detach())
    for e, expected in zip(entropy, official_grad, strict=True):
        torch.testing.assert_close(e.grad, expected)
    assert (entropy[1].grad[len(rollouts[1].prompt_ids) - 1:-1] != 0).all()  # its prefix carries no SFT


def test_loss_tokens_mode_keeps_the_loss_weights() -> None:
    cfg = LossConfig(entropy_coef=0.01)
    step = Samples.from_rollouts([_rollouts()], [0])
    seqs = batching.sequences(step, cfg, 8, BatchCounts.from_tensor(torch.tensor([6.0, 20.0, 6.0])))
    for s in seqs:
        assert torch.equal(s.entropy_weight, s.token_weight)
