"""Prefix-token objectives: gradients w.r.t. the logits against the analytic g(p) dp/dlogits (fp64, 1e-6)."""

import math

import pytest
import torch

from trapo_megatron.algo.loss import LossConfig, trapo_loss
from trapo_megatron.algo.objectives import PREFIX_OBJECTIVES, luffy, none, sft, trsft

ALPHA, GAMMA = 0.1, 0.1

# d loss / d p for each objective, written from the paper's definitions.
ANALYTIC_DLDP = {
    "trsft": lambda p: -1.0 / torch.clamp(p, min=ALPHA),
    "sft": lambda p: -1.0 / p,
    "luffy": lambda p: -GAMMA / (p + GAMMA) ** 2,
    "none": lambda p: torch.zeros_like(p),
}


def _logits_spanning_trust_region(num_tokens=40, vocab=9):
    """fp64 logits whose label probabilities range from ~1e-4 to ~0.99 (both sides of alpha)."""
    torch.manual_seed(0)
    logits = torch.randn(num_tokens, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (num_tokens,))
    logits[torch.arange(num_tokens), labels] += torch.linspace(-7.0, 7.0, num_tokens, dtype=torch.float64)
    return logits, labels


@pytest.mark.parametrize("name", sorted(ANALYTIC_DLDP))
def test_prefix_gradient_matches_analytic(name):
    logits, labels = _logits_spanning_trust_region()
    num_tokens, vocab = logits.shape
    weight = torch.rand(num_tokens, dtype=torch.float64)
    batch = {
        "labels": labels,
        "sft_mask": torch.ones(num_tokens, dtype=torch.bool),
        "rl_mask": torch.zeros(num_tokens, dtype=torch.bool),
        "advantages": torch.zeros(num_tokens),
        "token_weight": weight,
    }
    x = logits.clone().requires_grad_()
    loss, metrics = trapo_loss(
        x, batch, LossConfig(prefix_objective=name, trsft_alpha=ALPHA, luffy_gamma=GAMMA)
    )
    loss.backward()

    q = torch.softmax(logits, dim=-1)
    p = q[torch.arange(num_tokens), labels]
    onehot = torch.nn.functional.one_hot(labels, vocab).double()
    dp_dlogits = p[:, None] * (onehot - q)  # [T, V]
    expected = weight[:, None] * ANALYTIC_DLDP[name](p)[:, None] * dp_dlogits
    torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=1e-6)
    assert 0 < (p < ALPHA).sum() < num_tokens  # both regimes exercised
    assert metrics["prefix_outside_trust_region_tokens"] == (p < ALPHA).sum()
    torch.testing.assert_close(metrics["prefix_p_sum"], p.sum().float())


def test_trsft_value_is_sft_inside_and_continuous_at_alpha():
    p = torch.tensor([1.0, 0.5, ALPHA, ALPHA * (1 - 1e-12), 0.05, 1e-8], dtype=torch.float64)
    value = trsft(p.log(), ALPHA)
    torch.testing.assert_close(value[:3], -p[:3].log())
    torch.testing.assert_close(value[3], torch.tensor(-math.log(ALPHA), dtype=torch.float64))
    torch.testing.assert_close(value[4], torch.tensor(1 - math.log(ALPHA) - 0.5, dtype=torch.float64))
    assert torch.isfinite(value).all()


def test_objective_values():
    logp = torch.tensor([0.0, math.log(0.3)], dtype=torch.float64)
    torch.testing.assert_close(sft(logp), -logp)
    torch.testing.assert_close(luffy(logp, 0.1), -torch.tensor([1 / 1.1, 0.3 / 0.4], dtype=torch.float64))
    assert (none(logp) == 0).all()
    assert set(PREFIX_OBJECTIVES) == {"trsft", "sft", "luffy", "none"}


def test_alpha_one_caps_every_token():
    """alpha = 1: every expert token is outside the trust region, gradient -dp (a plain likelihood push)."""
    logp = torch.log(torch.tensor([0.2, 0.9], dtype=torch.float64)).requires_grad_()
    trsft(logp, 1.0).sum().backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([0.2, 0.9], dtype=torch.float64))
