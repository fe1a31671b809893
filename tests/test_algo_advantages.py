"""Dr.GRPO / GRPO advantages and reward statistics without guided samples, checked by hand."""

import pytest
import torch

from trapo_megatron.algo.advantages import ADVANTAGES, drgrpo_advantages, grpo_advantages, reward_stats


def test_drgrpo_mean_over_all_samples_no_std():
    # prompt 7: 8 samples, the last two guided (and correct): they count in the mean (0.5 = 4/8)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 1, 0, 0])
    groups = torch.tensor([7] * 8 + [3, 3])
    adv = drgrpo_advantages(rewards, groups)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.5, -0.5, 0.5, 0.5, 0.0, 0.0]))


def test_grpo_divides_by_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    adv = grpo_advantages(rewards, groups, eps=0.0)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # Bessel: sqrt(0.75 / 3) = 0.5
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / std)
    assert adv[4] == 0  # a group of one has no spread
    same = grpo_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long))
    assert (same == 0).all() and torch.isfinite(same).all()
    assert set(ADVANTAGES) == {"drgrpo", "grpo"}


def test_reward_stats_exclude_guided():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    guided = torch.tensor([False, False, True, True])
    stats = reward_stats(rewards, guided, response_lens=torch.tensor([10, 20, 99, 99]))
    assert stats["num_unguided"] == 2 and stats["reward_sum"] == 1.0
    torch.testing.assert_close(stats["reward_mean"], torch.tensor(0.5))
    torch.testing.assert_close(stats["reward_std"], torch.tensor(0.5))
    torch.testing.assert_close(stats["guided_fraction"], torch.tensor(0.5))
    torch.testing.assert_close(stats["response_len_mean"], torch.tensor(15.0))


@pytest.mark.parametrize("fn", [drgrpo_advantages, grpo_advantages])
def test_empty_and_all_guided(fn):
    assert fn(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    stats = reward_stats(torch.ones(2), torch.ones(2, dtype=torch.bool))
    assert stats["num_unguided"] == 0 and stats["reward_mean"] == 0
