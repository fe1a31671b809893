"""continuation_objective="none" (the SFT-only ablation): continuation tokens contribute no loss and no
gradient; prefix tokens are trained exactly as with the policy gradient on."""

import torch

from trapo_megatron.algo.loss import LossConfig, trapo_loss


def test_no_rl_equals_masking_the_continuation_out() -> None:
    g = torch.Generator().manual_seed(0)
    T, V = 12, 16
    logits = torch.randn(T, V, generator=g, requires_grad=True)
    sft = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    rl = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    batch = {"labels": torch.randint(0, V, (T,), generator=g), "sft_mask": sft, "rl_mask": rl,
             "advantages": torch.full((T,), 0.7), "token_weight": (sft | rl).float() / 7}
    loss, _ = trapo_loss(logits, batch, LossConfig(prefix_objective="sft", continuation_objective="none"))
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_batch = {**batch, "rl_mask": torch.zeros_like(rl)}
    ref, _ = trapo_loss(ref_logits, ref_batch, LossConfig(prefix_objective="sft"))
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[rl].abs().sum() == 0 and grad[sft].abs().sum() > 0
