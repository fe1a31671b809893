"""GRPO continuation loss: ratios, clipping, TIS and the entropy bonus, with every intermediate by hand."""

import math

import torch

from trapo_megatron.algo.policy_gradient import entropy_bonus, policy_gradient_loss, tis_weights


def _logp_for_ratios(ratios, old):
    return (torch.log(torch.tensor(ratios, dtype=torch.float64)) + old).requires_grad_()


def test_unclipped_ratio_and_gradient():
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    logp = _logp_for_ratios([0.5, 1.0, 1.5], old)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([True, True, True])
    loss, clipped = policy_gradient_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor([-0.5, 2.0, -0.75], dtype=torch.float64))
    assert not clipped.any()
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, 2.0, -0.75], dtype=torch.float64))  # -A * r


def test_clipping_by_hand():
    # ratios 0.5, 1.0, 1.5 with eps 0.2 each side: r clipped to [0.8, 1.2]
    old = torch.zeros(6, dtype=torch.float64)
    logp = _logp_for_ratios([0.5, 1.0, 1.5, 0.5, 1.0, 1.5], old)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(6, dtype=torch.bool)
    loss, clipped = policy_gradient_loss(logp, old, adv, mask, 0.2, 0.2)
    # A>0: max(-r, -clip(r)) -> r=0.5: max(-0.5,-0.8)=-0.5 (not clipped); r=1.5: max(-1.5,-1.2)=-1.2 (clipped)
    # A<0: max(r, clip(r))   -> r=0.5: max(0.5, 0.8)=0.8 (clipped);     r=1.5: max(1.5, 1.2)=1.5 (not clipped)
    torch.testing.assert_close(loss, torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5], dtype=torch.float64))
    assert clipped.tolist() == [False, False, True, True, False, False]
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, -1.0, 0.0, 0.0, 1.0, 1.5], dtype=torch.float64))


def test_one_sided_clip_and_mask():
    old = torch.zeros(3, dtype=torch.float64)
    logp = _logp_for_ratios([0.5, 1.5, 1e30], old)  # position 2 is off-mask garbage
    adv = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    loss, clipped = policy_gradient_loss(logp, old, adv, mask, None, 0.2)  # no lower clip
    torch.testing.assert_close(loss, torch.tensor([0.5, -1.2, 0.0], dtype=torch.float64))
    assert clipped.tolist() == [False, True, False]
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[2] == 0


def test_tis_weights_truncate_and_detach():
    old = torch.log(torch.tensor([0.5, 0.9, 0.2], dtype=torch.float64)).requires_grad_()
    rollout = torch.log(torch.tensor([0.5, 0.3, 0.4], dtype=torch.float64))
    mask = torch.tensor([True, True, False])
    w, truncated = tis_weights(old, rollout, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))  # 0.9/0.3 = 3 -> 2
    assert truncated.tolist() == [False, True, False] and not w.requires_grad


def test_entropy_bonus():
    h = torch.tensor([2.0, 1.0, 5.0])
    out = entropy_bonus(h, torch.tensor([True, True, False]), 0.001)
    torch.testing.assert_close(out, torch.tensor([-0.002, -0.001, 0.0]))
    assert math.isclose(float(entropy_bonus(h, torch.ones(3, dtype=torch.bool), 0.0).abs().sum()), 0.0)
