"""TP=2, PP=2 and TP=2 x PP=2 give TP=1's logits, loss and gradients (TP > 1 with sequence parallelism on, as a
GPU run has it, over packed rows of odd lengths padded to a multiple of TP); DP=2 with the distributed optimizer
gives DP=1's losses over several optimizer steps. Real megatron-core models from the builder, through
megatron-core's own forward_backward_func, on spawned gloo workers."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from trapo_megatron.testing import run_distributed

pytestmark = pytest.mark.timeout(900)  # spawned Megatron worlds: slow on a loaded 2-core machine

FAMILIES = (("qwen2", False), ("llama", True))  # Qwen2: QKV bias, untied; Llama: no bias, tied


def _sequences(seed: int, n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(5, 17, (1,), generator=g)),), generator=g) for _ in range(n)]


def _micro_batches(seed: int, vocab: int, num_micro: int = 2, per_micro: int = 2) -> list[dict]:
    """Packed micro-batches with next-token labels inside each sequence and global 1/num_tokens weights."""
    from trapo_megatron.data.packing import pack_row

    seqs = _sequences(seed, num_micro * per_micro, vocab)
    total_targets = sum(len(s) - 1 for s in seqs)
    out = []
    for m in range(num_micro):
        group = seqs[m * per_micro:(m + 1) * per_micro]
        mb = pack_row(group)
        labels = torch.cat([torch.cat([s[1:], s[:1]]) for s in group])
        weight = torch.cat([torch.cat([torch.ones(len(s) - 1), torch.zeros(1)]) for s in group])
        mb.update(labels=labels, weight=weight / total_targets)
        out.append(mb)
    return out


def _ce_loss(stash: list):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def loss_fn(logits: torch.Tensor, mb: dict):
        stash.append(logits.detach())
        per_token = vocab_parallel_cross_entropy(logits.unsqueeze(1).float(), mb["labels"].unsqueeze(1)).view(-1)
        return (per_token * mb["weight"]).sum(), {}

    return loss_fn


def _gather_logits(local: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    size = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def equivalence_worker(rank: int, world: int, tp: int, pp: int) -> dict:
    """Per family: full logits and loss (last stage, TP rank 0) and full grads of this stage."""
    from _megatron_helpers import fill_deterministic, full_grads, tiny_hf_config

    from trapo_megatron.megatron import model_builder, platform, step

    parallel = platform.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    platform.initialize(parallel, seed=7)
    result = {}
    for family, tied in FAMILIES:
        hf = tiny_hf_config(family, tied=tied)
        chunks = step.wrap_ddp(model_builder.build_model(hf, parallel), use_distributed_optimizer=False)
        fill_deterministic(chunks, tied)
        stash: list = []
        reported = step.forward_backward(chunks, _micro_batches(3, hf.vocab_size), _ce_loss(stash))
        grads = full_grads(chunks)
        logits = [_gather_logits(x) for x in stash]
        result[family] = {
            "sequence_parallel": chunks[0].config.sequence_parallel,
            "grads": grads,
            "logits": logits if logits else None,
            "loss": float(sum(r["loss"] for r in reported)) if reported else None,
        }
    platform.destroy()
    return result


def _merge(results: list[dict], family: str) -> tuple[list, float, dict]:
    logits = next(r[family]["logits"] for r in results if r[family]["logits"])
    loss = next(r[family]["loss"] for r in results if r[family]["loss"] is not None)
    grads: dict = {}
    for r in results:
        grads.update(r[family]["grads"])
    return logits, loss, grads


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_distributed(equivalence_worker, 1, 1, 1)[0]


def test_the_packed_rows_have_odd_lengths() -> None:
    """What makes the padding matter: every micro-batch of the parity runs is odd (S % TP != 0 at TP 2)."""
    assert [mb["tokens"].shape[1] % 2 for mb in _micro_batches(3, 64)] == [1, 1]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_layout_matches_tp1(reference: dict, tp: int, pp: int) -> None:
    results = run_distributed(equivalence_worker, tp * pp, tp, pp)
    for family, tied in FAMILIES:
        assert all(r[family]["sequence_parallel"] == (tp > 1) for r in results)
        ref_logits, ref_loss, ref_grads = _merge([reference], family)
        logits, loss, grads = _merge(results, family)
        for a, b in zip(logits, ref_logits, strict=True):  # the padding pseudo-sequence: rows past the reference
            assert a.shape[0] == b.shape[0] + (-b.shape[0] % tp), (a.shape, b.shape)
        logits = [a[:b.shape[0]] for a, b in zip(logits, ref_logits, strict=True)]
        if tied and pp > 1:  # the last stage's copy of a tied embedding gets the embedding's summed grad
            torch.testing.assert_close(grads.pop("output_layer.weight"), ref_grads["embedding.word_embeddings.weight"],
                                       atol=1e-5, rtol=1e-5)
        for a, b in zip(logits, ref_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert abs(loss - ref_loss) < 1e-5, (family, loss, ref_loss)
        assert grads.keys() == ref_grads.keys(), (family, grads.keys() ^ ref_grads.keys())
        for name in ref_grads:
            assert ref_grads[name].abs().sum() > 0, f"{family}: zero reference grad for {name}"
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=f"{family} {name}")


def dp_worker(rank: int, world: int, steps: int) -> list[float]:
    """Losses of ``steps`` Adam steps; each DP rank takes its share of the same global batch."""
    from _megatron_helpers import fill_deterministic, tiny_hf_config

    from trapo_megatron.megatron import model_builder, platform, step

    parallel = platform.ParallelConfig()
    platform.initialize(parallel, seed=11)
    hf = tiny_hf_config("qwen2")
    chunks = step.wrap_ddp(model_builder.build_model(hf, parallel), use_distributed_optimizer=True)
    fill_deterministic(chunks, tied=False)
    optimizer, scheduler = step.build_optimizer(chunks, step.OptimizerConfig(lr=1e-2), total_steps=steps)
    losses = []
    for _ in range(steps):
        step.zero_grad(chunks, optimizer)
        batch = _micro_batches(100, hf.vocab_size, num_micro=4)  # the same batch: the loss must fall
        mine = batch[rank::world]
        reported = step.forward_backward(chunks, mine, _ce_loss([]))
        loss = torch.stack([r["loss"] for r in reported]).sum()
        dist.all_reduce(loss)
        applied, grad_norm, nonfinite = step.optimizer_step(optimizer, scheduler, loss_finite=True)
        assert applied and grad_norm > 0 and not nonfinite
        losses.append(float(loss))
    platform.destroy()
    return losses


def test_data_parallel_matches_single_rank() -> None:
    single = run_distributed(dp_worker, 1, 3)[0]
    dp2 = run_distributed(dp_worker, 2, 3)
    assert dp2[0] == pytest.approx(dp2[1], abs=0)
    assert single[0] > single[-1], f"training did not reduce the loss: {single}"
    assert dp2[0] == pytest.approx(single, abs=1e-5)


def guard_worker(rank: int, world: int) -> list[str]:
    """One applied step, then a NaN-gradient step and a NaN-loss step: both skipped, and nothing the next
    update depends on moved (parameters, Adam moments and step, the LR schedule)."""
    from _megatron_helpers import fill_deterministic, tiny_hf_config

    from trapo_megatron.megatron import model_builder, platform, step

    parallel = platform.ParallelConfig()
    platform.initialize(parallel, seed=11)
    hf = tiny_hf_config("qwen2")
    chunks = step.wrap_ddp(model_builder.build_model(hf, parallel), use_distributed_optimizer=True)
    fill_deterministic(chunks, tied=False)
    optimizer, scheduler = step.build_optimizer(chunks, step.OptimizerConfig(lr=1e-2), total_steps=4)
    inner = optimizer.chained_optimizers[0].optimizer

    def run(poison: float, loss_finite: bool) -> tuple[bool, float, str]:
        step.zero_grad(chunks, optimizer)
        ce = _ce_loss([])
        step.forward_backward(chunks, _micro_batches(100, hf.vocab_size), lambda lg, mb: (
            ce(lg, mb)[0] * poison, {}))
        return step.optimizer_step(optimizer, scheduler, loss_finite=loss_finite)

    def snapshot() -> list[torch.Tensor]:
        params = [p.detach().clone() for c in chunks for p in c.parameters()]
        states = [v.clone() for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return params + states + [torch.tensor(float(scheduler.num_steps))]

    assert run(1.0, True)[0]
    before = snapshot()
    outcomes = [run(float("nan"), True), run(1.0, False)]
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert run(1.0, True)[0]  # and training goes on
    platform.destroy()
    return [bad for applied, _, bad in outcomes if not applied]


def test_non_finite_gradients_or_loss_skip_the_update() -> None:
    assert run_distributed(guard_worker, 1)[0] == ["grad_norm", "loss"]
