"""Vocab-parallel log-prob / entropy kernels against torch's own log_softmax, and TP=2 against TP=1."""

import pytest
import torch
import torch.distributed as dist

from trapo_megatron.algo.loss import LossConfig, trapo_loss
from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_logprobs_entropy
from trapo_megatron.testing import run_distributed


def _reference(logits, labels, temperature):
    """(logp, entropy) from a full fp64 log_softmax; label < 0 -> logp 0."""
    logsm = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = logsm.gather(1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(labels >= 0, logp, torch.zeros_like(logp))
    return logp, -(logsm.exp() * logsm).sum(-1)


@pytest.mark.parametrize(
    "dtype,temperature,chunk,tol,grad_tol",
    [
        (torch.float64, 1.0, None, 1e-12, 1e-12),
        (torch.float64, 0.6, 3, 1e-12, 1e-12),
        (torch.float32, 1.0, 5, 1e-5, 1e-6),
        (torch.float32, 1.3, 1, 1e-5, 1e-6),
        (torch.bfloat16, 1.0, 4, 1e-5, 2e-2),  # fp32 math on bf16 inputs: only the grad is rounded to bf16
    ],
)
def test_logprobs_entropy_match_log_softmax(dtype, temperature, chunk, tol, grad_tol):
    torch.manual_seed(0)
    logits = (4 * torch.randn(23, 31)).to(dtype).requires_grad_()
    labels = torch.randint(0, 31, (23,))
    labels[[0, 7]] = -100  # no target
    g_lp, g_h = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)

    logp, ent = vocab_parallel_logprobs_entropy(logits, labels, None, temperature, chunk_tokens=chunk)
    assert logp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (logp * g_lp.to(logp.dtype) + ent * g_h.to(ent.dtype)).sum().backward()

    ref_in = logits.detach().double().requires_grad_()
    ref_lp, ref_h = _reference(ref_in, labels, temperature)
    (ref_lp * g_lp + ref_h * g_h).sum().backward()
    torch.testing.assert_close(logp.double(), ref_lp, atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_h, atol=tol, rtol=0)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, atol=grad_tol, rtol=grad_tol)


def test_logprobs_only_and_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-1e30, 5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([1, 2, 0])
    logp = vocab_parallel_logprobs(logits, labels)
    assert torch.isfinite(logp[:2]).all()
    torch.testing.assert_close(logp[:2], torch.tensor([-2e4, -torch.log(torch.tensor(3.0)).item()]))
    logp[:2].sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_empty_batch():
    logits = torch.zeros(0, 7, requires_grad=True)
    logp, ent = vocab_parallel_logprobs_entropy(logits, torch.zeros(0, dtype=torch.long))
    (logp.sum() + ent.sum()).backward()
    assert logits.grad.shape == (0, 7)


T, V = 19, 24


def _tp_inputs():
    g = torch.Generator().manual_seed(123)
    logits = 3 * torch.randn(T, V, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[-1] = -100
    sft = torch.zeros(T, dtype=torch.bool)
    sft[2:7] = True
    rl = torch.zeros(T, dtype=torch.bool)
    rl[8:17] = True
    batch = {
        "labels": labels,
        "sft_mask": sft,
        "rl_mask": rl,
        "advantages": torch.randn(T, generator=g),
        "token_weight": torch.rand(T, generator=g) * (sft | rl),
        "old_logprobs": torch.log_softmax(logits + 0.3 * torch.randn(T, V, generator=g), -1).gather(
            1, labels.clamp(min=0)[:, None]
        )[:, 0],
        "rollout_logprobs": torch.log_softmax(logits + 0.3 * torch.randn(T, V, generator=g), -1).gather(
            1, labels.clamp(min=0)[:, None]
        )[:, 0],
    }
    cfg = LossConfig(entropy_coef=0.01, tis_cap=1.5, clip_ratio_low=0.1, clip_ratio_high=0.1, temperature=0.8)
    return logits, labels, batch, cfg


def _run_kernels(logits_shard, labels, batch, cfg, group):
    """One shard: logp, entropy, loss and metrics, and the gradient of each on the shard."""
    out = {}
    x = logits_shard.clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs_entropy(x, labels, group, 0.8, chunk_tokens=4)
    (logp * torch.arange(T)).sum().backward()
    out["logp"], out["grad_logp"] = logp.detach(), x.grad.clone()
    x.grad = None
    logp, ent = vocab_parallel_logprobs_entropy(x, labels, group, 0.8, chunk_tokens=4)
    (ent * torch.arange(T)).sum().backward()
    out["entropy"], out["grad_entropy"] = ent.detach(), x.grad.clone()
    x.grad = None
    loss, metrics = trapo_loss(x, batch, cfg, tp_group=group)
    loss.backward()
    out["loss"], out["metrics"], out["grad_loss"] = loss.detach(), metrics, x.grad.clone()
    return out


def _tp_worker(rank, world_size):
    dist.init_process_group("gloo")
    logits, labels, batch, cfg = _tp_inputs()
    shard = logits.chunk(world_size, dim=-1)[rank]
    tp = _run_kernels(shard, labels, batch, cfg, dist.group.WORLD)
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    one = _run_kernels(logits, labels, batch, cfg, singles[rank])  # TP=1 as a group of one
    return tp, one


def test_tp2_equals_tp1_values_and_grads():
    logits, labels, batch, cfg = _tp_inputs()
    ref = _run_kernels(logits, labels, batch, cfg, None)
    # Independent check of the TP=1 values against log_softmax.
    ref_lp, ref_h = _reference(logits, labels, 0.8)
    torch.testing.assert_close(ref["logp"].double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref["entropy"].double(), ref_h, atol=1e-5, rtol=0)

    results = run_distributed(_tp_worker, 2, timeout=120)
    for rank, (tp, one) in enumerate(results):
        for key in ("logp", "entropy", "loss"):
            torch.testing.assert_close(tp[key], ref[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one[key], ref[key], atol=0, rtol=0)
        for key in ref["metrics"]:
            torch.testing.assert_close(tp["metrics"][key], ref["metrics"][key], atol=1e-5, rtol=1e-5)
        for key in ("grad_logp", "grad_entropy", "grad_loss"):
            torch.testing.assert_close(tp[key], ref[key].chunk(2, dim=-1)[rank], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one[key], ref[key], atol=0, rtol=0)
    assert ref["metrics"]["tis_truncated_tokens"] > 0 and ref["metrics"]["sft_tokens"] == 5
