"""Weight decay on every parameter (the official AdamW over biases and norms too) against torch.optim.AdamW.

One spawned gloo rank builds a tiny Qwen2 (it has qkv biases and norm weights) through the project's model
builder, gives every parameter a fixed value and gradient and takes one step of the project's megatron optimizer; the
oracle is torch.optim.AdamW on copies of the same parameters with the same gradients.
"""

from __future__ import annotations

import pytest
import torch

from trapo_megatron.testing import run_distributed

LR, WD = 1e-2, 0.1


def _one_step(rank: int, world: int) -> list[dict]:
    """One step with decay_all_parameters True, then False, from the same values and gradients."""
    from types import SimpleNamespace

    from _megatron_helpers import TINY

    from trapo_megatron.megatron import model_builder, platform, step

    hf = SimpleNamespace(**TINY, model_type="qwen2", tie_word_embeddings=False, hidden_act="silu",
                         rope_parameters={"rope_theta": 1e4})
    parallel = platform.ParallelConfig()
    platform.initialize(parallel, seed=3)
    outs = []
    for decay_all in (True, False):
        ddp = step.wrap_ddp(model_builder.build_model(hf, parallel))
        cfg = step.OptimizerConfig(lr=LR, weight_decay=WD, decay_all_parameters=decay_all, clip_grad=0.0)
        optimizer, _ = step.build_optimizer(ddp, cfg, total_steps=1)
        before, grads = {}, {}
        g = torch.Generator().manual_seed(5)
        for name, p in ddp[0].named_parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))  # biases start at 0: decay would not show
            before[name] = p.detach().clone()
            grads[name] = torch.randn(p.shape, generator=g)
            p.main_grad.copy_(grads[name])
        with platform.cuda_literals_on_cpu():
            applied, _, _ = optimizer.step()
        after = {name: p.detach().clone() for name, p in ddp[0].named_parameters()}
        outs.append({"applied": applied, "before": before, "grads": grads, "after": after})
    platform.destroy()
    return outs


def _adamw(before: dict, grads: dict) -> dict:
    params = {n: torch.nn.Parameter(t.clone()) for n, t in before.items()}
    opt = torch.optim.AdamW(params.values(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.timeout(240)
def test_decay_all_parameters_equals_torch_adamw_and_the_default_skips_biases_and_norms() -> None:
    for decay_all, out in zip((True, False), run_distributed(_one_step, 1)[0], strict=True):
        assert out["applied"]
        expected = _adamw(out["before"], out["grads"])
        one_d = [n for n, t in out["before"].items() if t.dim() == 1]
        assert any(n.endswith(".bias") for n in one_d) and any("layernorm" in n for n in one_d), one_d
        for name, value in out["after"].items():
            if decay_all or name not in one_d:
                torch.testing.assert_close(value, expected[name], atol=1e-7, rtol=1e-6, msg=name)
            else:  # megatron's default: no decay on 1-D parameters, so AdamW's decay term lr * wd * p is missing
                torch.testing.assert_close(value, expected[name] + LR * WD * out["before"][name], atol=1e-7,
                                           rtol=1e-6, msg=name)
                assert not torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
