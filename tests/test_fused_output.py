"""The fused output layer (hidden states -> log-prob / entropy, no logits) against the unfused path: megatron's
own output-layer linear (tensor_parallel/layers.py) + the vocab-parallel kernels, at TP=1 (also against an
fp64 log_softmax) and TP=2 with and without sequence parallelism, tied and untied, chunks that do and do not
divide T. Both fused paths: gradients recomputed in backward (log-probs and entropy against any cotangent, and
the TRAPO loss) and gradients in forward (the TRAPO loss, the only thing that path returns). The embedding in front is vocab-parallel too (megatron's mapping functions), so a tied weight gets
both of its gradients and the sequence-parallel scatter/gather runs in both directions."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from trapo_megatron.algo.loss import LossConfig, trapo_loss_from_logprobs
from trapo_megatron.megatron.fused_output import fused_logprobs_entropy, fused_trapo_loss
from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs_entropy
from trapo_megatron.testing import run_distributed

T, H, V = 20, 16, 24
CFG = LossConfig(entropy_coef=0.01, tis_cap=1.5, clip_ratio_low=0.1, clip_ratio_high=0.1, temperature=0.8)
CASES = list(itertools.product((False, True), (4, 3, None)))  # (tied, chunk tokens): 4 divides T, 3 does not
TP2_CASES = list(itertools.product((False, True), (4, 3)))
PATHS = ("recompute", "forward")  # the fused paths (loss.fused_output_grads); "unfused" is the reference


def _inputs(dtype: torch.dtype):
    """Full embedding, full output weight, mixing matrix, tokens, and the TRAPO batch."""
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64)
    out = torch.randn(V, H, generator=g, dtype=torch.float64)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5
    tokens = torch.randint(0, V, (T,), generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[0, 11]] = -100
    sft, rl = torch.zeros(T, dtype=torch.bool), torch.zeros(T, dtype=torch.bool)
    sft[2:7], rl[8:18] = True, True
    base = -torch.rand(T, generator=g) * 3
    batch = {"labels": labels, "sft_mask": sft, "rl_mask": rl, "advantages": torch.randn(T, generator=g),
             "token_weight": torch.rand(T, generator=g) * (sft | rl), "old_logprobs": base,
             "rollout_logprobs": base + 0.3 * torch.randn(T, generator=g)}
    probe = torch.randn(2, T, generator=g, dtype=torch.float64)  # cotangents for logp and entropy
    return [x.to(dtype) for x in (emb, out, mix)], tokens, batch, probe


def _hidden(emb_shard, mix, tokens, rank, tp, group, sp):
    """Vocab-parallel embedding (masked lookup, then megatron's reduce over TP, or reduce-scatter with SP)
    and one mixing layer: replicated [T, H] hidden states, or this rank's [T/TP, H] sequence shard."""
    from megatron.core.tensor_parallel import mappings

    rows = emb_shard.shape[0]
    local = tokens - rank * rows
    held = ((local >= 0) & (local < rows)).unsqueeze(-1)
    e = emb_shard[local.clamp(0, rows - 1)] * held
    if tp > 1:
        e = (mappings.reduce_scatter_to_sequence_parallel_region if sp
             else mappings.reduce_from_tensor_model_parallel_region)(e, group=group)
    return torch.tanh(e @ mix)


def _logprobs(path: str, hidden, weight, labels, group, tp, sp, chunk):
    if path == "recompute":
        return fused_logprobs_entropy(hidden, weight, labels, group, CFG.temperature, chunk, sequence_parallel=sp)
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

    logits = linear_with_grad_accumulation_and_async_allreduce(
        hidden, weight, None, gradient_accumulation_fusion=False, allreduce_dgrad=tp > 1 and not sp,
        sequence_parallel=sp, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=group)
    return vocab_parallel_logprobs_entropy(logits, labels, group, CFG.temperature, chunk)


def _run(path, params, tokens, batch, probe, rank, tp, group, sp, tied, chunk):
    """logp, entropy, loss, metrics and the gradients of every leaf, first of a probe of (logp, entropy),
    then of the TRAPO loss (the loss only on the "forward" path, which has no log-probs). The mixing matrix's grad is summed over TP with SP (a sequence-parallel
    parameter: megatron all-reduces such grads in finalize_model_grads)."""
    import torch.distributed as dist

    emb_full, out_full, mix_full = params
    emb = emb_full.chunk(tp)[rank].clone().requires_grad_()
    out = emb if tied else out_full.chunk(tp)[rank].clone().requires_grad_()
    mix = mix_full.clone().requires_grad_()
    leaves = {"emb": emb, "mix": mix} if tied else {"emb": emb, "out": out, "mix": mix}
    result = {}
    for what in ("loss",) if path == "forward" else ("probe", "loss"):
        hidden = _hidden(emb, mix, tokens, rank, tp, group, sp)
        if path == "forward":
            loss, metrics = fused_trapo_loss(hidden, out, batch, replace(CFG, chunk_tokens=chunk), group, sp)
        else:
            logp, ent = _logprobs(path, hidden, out, batch["labels"], group, tp, sp, chunk)
            loss, metrics = trapo_loss_from_logprobs(logp, ent, batch, CFG)
        if what == "probe":
            (logp * probe[0].to(logp.dtype) + ent * probe[1].to(ent.dtype)).sum().backward()
            result.update(logp=logp.detach(), entropy=ent.detach())
        else:
            loss.backward()
            result.update(loss=loss.detach(), metrics=metrics)
        for name, leaf in leaves.items():
            grad = leaf.grad.clone()
            if name == "mix" and sp:
                dist.all_reduce(grad, group=group)
            result[f"{what}_grad_{name}"] = grad
            leaf.grad = None
    return result


def _compare(got: dict, ref: dict, rank: int, tp: int, tol: float) -> None:
    """Every entry of ``got`` equals ``ref``'s (the "forward" path has the loss entries only)."""
    loss_only = {"loss", "metrics"} | {k for k in ref if k.startswith("loss_grad")}
    assert got.keys() in (ref.keys(), loss_only)
    assert "loss_grad_mix" in got and "loss_grad_emb" in got
    for key, mine in got.items():
        value = ref[key]
        if key == "metrics":
            for m in value:  # fp32 sums by design (loss.py), chunk by chunk on the "forward" path
                torch.testing.assert_close(mine[m], value[m], atol=max(tol, 1e-6), rtol=max(tol, 1e-6), msg=m)
            continue
        if "grad_emb" in key or "grad_out" in key:  # vocab-sharded over TP
            value = value.chunk(tp)[rank]
        assert value.abs().sum() > 0, f"zero reference {key}"
        torch.testing.assert_close(mine, value, atol=tol, rtol=tol, msg=key)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tied,chunk", CASES)
def test_tp1_matches_unfused_and_log_softmax(dtype, tol, tied, chunk):
    params, tokens, batch, probe = _inputs(dtype)
    run = lambda path: _run(path, params, tokens, batch, probe, 0, 1, None, False, tied, chunk)
    ref = run("unfused")
    for path in PATHS:
        _compare(run(path), ref, 0, 1, tol)
    # Independent oracle for the unfused values: a full fp64 log_softmax of the logits.
    emb, out, mix = (p.double() for p in params)
    logsm = torch.log_softmax(torch.tanh(emb[tokens] @ mix) @ (emb if tied else out).t() / CFG.temperature, -1)
    labels = batch["labels"]
    logp = torch.where(labels >= 0, logsm.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(ref["logp"].double(), logp, atol=tol, rtol=0)
    torch.testing.assert_close(ref["entropy"].double(), -(logsm.exp() * logsm).sum(-1), atol=tol, rtol=0)


def test_auto_mode_per_weight_dtype():
    """loss.fused_output_grads="auto": gradients in forward wherever the fp32 weight-gradient sum has a home (an
    fp32 / fp64 weight itself, or DDP's fp32 main_grad, which the trainer's weights always have), recomputed
    in backward for a 16-bit weight without one; explicit settings pass through."""
    from trapo_megatron.megatron.chunking import grads_mode

    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    assert LossConfig().fused_output_grads == "auto"
    assert [grads_mode("auto", d, main_grad=False) for d in dtypes] == ["forward", "forward", "recompute", "recompute"]
    assert [grads_mode("auto", d, main_grad=True) for d in dtypes] == ["forward"] * 4
    assert grads_mode("forward", torch.bfloat16, False) == "forward"
    assert grads_mode("recompute", "float32", True) == "recompute"


def test_bf16_close_to_fp32():
    """bf16 hidden states and weight: fp32 statistics; the gradients are rounded to bf16 like the unfused."""
    params, tokens, batch, probe = _inputs(torch.bfloat16)
    ref = _run("unfused", params, tokens, batch, probe, 0, 1, None, False, False, 3)
    got = _run("recompute", params, tokens, batch, probe, 0, 1, None, False, False, 3)
    assert got["probe_grad_out"].dtype == torch.bfloat16
    for key in ("logp", "entropy", "loss"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5)
    for key in ("probe_grad_out", "probe_grad_emb", "loss_grad_mix"):
        torch.testing.assert_close(got[key].float(), ref[key].float(), atol=2e-2, rtol=2e-2)
    # gradients in forward: the weight gradient summed in fp32 over the chunks, rounded once
    got = _run("forward", params, tokens, batch, probe, 0, 1, None, False, False, 3)
    assert got["loss_grad_out"].dtype == torch.bfloat16
    torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
    for key in ("loss_grad_out", "loss_grad_emb", "loss_grad_mix"):
        torch.testing.assert_close(got[key].float(), ref[key].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gradients_in_forward_sum_into_main_grad(dtype, tol):
    """A weight with Megatron DDP's fp32 main_grad (the trainer's, step.wrap_ddp): the weight gradient is
    summed into it in forward and no .grad is returned (the whole-model test below checks it through real
    DDP, tied included); the other gradients are unchanged. A forward without autograd leaves it alone; an
    upstream gradient other than 1 is refused, a non-finite one poisons it as upstream x gradient would."""
    params, tokens, batch, probe = _inputs(dtype)
    ref = _run("unfused", params, tokens, batch, probe, 0, 1, None, False, False, 3)
    emb, out, mix = (p.clone().requires_grad_() for p in params)
    cfg = replace(CFG, chunk_tokens=7)  # 3 GEMM chunks, the last one short
    out.main_grad = torch.full(out.shape, 0.5)  # earlier micro-batches' sum: added to, not overwritten

    def loss_times(scale: float = 1.0) -> torch.Tensor:
        emb.grad = mix.grad = None
        loss, _ = fused_trapo_loss(torch.tanh(emb[tokens] @ mix), out, batch, cfg)
        return loss * scale

    loss_times().backward()
    assert out.grad is None
    torch.testing.assert_close(out.main_grad - 0.5, ref["loss_grad_out"].float(), atol=tol, rtol=tol)
    for name, leaf in (("emb", emb), ("mix", mix)):
        torch.testing.assert_close(leaf.grad.float(), ref[f"loss_grad_{name}"].float(), atol=tol, rtol=tol)
    before = out.main_grad.clone()
    with torch.no_grad():
        loss_times()
    torch.testing.assert_close(out.main_grad, before, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="upstream gradient must be 1, got 2.0.*fused_output_grads=recompute"):
        loss_times(2.0).backward()
    loss_times(float("nan")).backward()
    assert not torch.isfinite(out.main_grad).any()


def _tp2_worker(rank: int, world: int) -> dict:
    from megatron.core import parallel_state as ps

    from trapo_megatron.megatron import platform

    platform.initialize(platform.ParallelConfig(tensor_model_parallel_size=world))
    group = ps.get_tensor_model_parallel_group()
    params, tokens, batch, probe = _inputs(torch.float32)
    params = [platform.to_device(p) for p in params]
    tokens, probe = platform.to_device(tokens), platform.to_device(probe)
    batch = {k: platform.to_device(v) for k, v in batch.items()}
    out = {}
    for sp, (tied, chunk) in itertools.product((False, True), TP2_CASES):
        for path in ("unfused", *PATHS):
            out[(path, sp, tied, chunk)] = _run(path, params, tokens, batch, probe, rank, world, group, sp,
                                                 tied, chunk)
    platform.destroy()
    return out


def test_tp2_with_and_without_sequence_parallel_matches_tp1():
    results = run_distributed(_tp2_worker, 2, timeout=300)
    params, tokens, batch, probe = _inputs(torch.float32)
    refs = {}
    for rank, res in enumerate(results):
        for (path, sp, tied, chunk), got in res.items():
            if (tied, chunk) not in refs:
                refs[tied, chunk] = _run("unfused", params, tokens, batch, probe, 0, 1, None, False, tied, chunk)
            _compare(got, refs[tied, chunk], rank, 2, 1e-5)
    assert len(results[0]) == 24


FAMILIES = (("qwen2", False), ("llama", True))  # untied; tied (the output weight is the embedding's)


def _trapo_micro_batches(vocab: int) -> list[dict]:
    """test_megatron_parallel's packed micro-batches with the TRAPO fields: every third target a prefix
    (SFT) token, the others continuations, advantages per micro-batch, token weights 1/targets."""
    from test_megatron_parallel import _micro_batches

    out = []
    for i, mb in enumerate(_micro_batches(3, vocab)):
        weight = mb.pop("weight")
        loss_tokens = weight > 0
        sft = loss_tokens & (torch.arange(len(weight)) % 3 == 0)
        mb.update(sft_mask=sft, rl_mask=loss_tokens & ~sft, advantages=torch.full_like(weight, 0.5 - i),
                  token_weight=weight)
        out.append(mb)
    return out


def _model_worker(rank: int, world: int, tp: int) -> dict:
    """Per family and path (unfused, and the two fused paths): the metric sums (last stage) and this stage's full gradients of a
    real GPTModel through megatron's forward_backward_func, as MegatronPolicy.train_step computes them;
    the pipeline has world / tp stages."""
    from _megatron_helpers import fill_deterministic, full_grads, tiny_hf_config
    from megatron.core import parallel_state as ps

    from trapo_megatron.algo.loss import trapo_loss
    from trapo_megatron.megatron import fused_output, model_builder, platform, step

    parallel = platform.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=world // tp)
    platform.initialize(parallel, seed=7)
    tp_group = ps.get_tensor_model_parallel_group()
    result = {}
    for family, tied in FAMILIES:
        hf = tiny_hf_config(family, tied=tied)
        chunks = step.wrap_ddp(model_builder.build_model(hf, parallel), use_distributed_optimizer=False)
        fill_deterministic(chunks, tied)
        for path in ("unfused", *PATHS):
            def loss_fn(output, mb, path=path, model=chunks[-1]):
                if path != "unfused":
                    cfg = replace(CFG_MODEL, fused_output_grads=path)
                    return fused_output.trapo_loss_from_hidden(output, model, mb, cfg, tp_group)
                return trapo_loss(output, mb, CFG_MODEL, tp_group=tp_group)

            for c in chunks:
                c.zero_grad_buffer()
            reported = step.forward_backward(chunks, _trapo_micro_batches(hf.vocab_size), loss_fn,
                                             hidden_states=path != "unfused")
            metrics = {k: sum(float(r[k]) for r in reported) for k in reported[0]} if reported else None
            result[family, path] = {"grads": full_grads(chunks), "metrics": metrics,
                                     "sp": chunks[-1].module.config.sequence_parallel}
    platform.destroy()
    return result


CFG_MODEL = LossConfig(entropy_coef=0.01, clip_ratio_low=0.1, clip_ratio_high=0.1, temperature=0.8, chunk_tokens=5)


def _merge_stages(results: list[dict], key: tuple) -> dict:
    """One layout's metrics (from the last stage) and gradients (every stage's)."""
    grads: dict = {}
    for r in results:
        grads.update(r[key]["grads"])
    return {"grads": grads, "metrics": next(r[key]["metrics"] for r in results if r[key]["metrics"]),
            "sp": results[0][key]["sp"]}


@pytest.mark.timeout(900)
def test_whole_model_gradients_fused_equal_unfused_at_tp1_tp2sp_pp2():
    ref = run_distributed(_model_worker, 1, 1)[0]
    layouts = {"tp2": run_distributed(_model_worker, 2, 2), "pp2": run_distributed(_model_worker, 2, 1)}
    for family, tied in FAMILIES:
        base = ref[family, "unfused"]
        runs = {f"tp1 {path}": ref[family, path] for path in PATHS}
        runs.update({f"{name} {path}": _merge_stages(res, (family, path))
                     for name, res in layouts.items() for path in ("unfused", *PATHS)})
        # SP on at TP2 (on the CPU path too)
        assert [got["sp"] for got in runs.values()] == [False, False, True, True, True, False, False, False]
        for run, got in runs.items():
            grads = dict(got["grads"])
            if tied and run.startswith("pp2"):  # the last stage's copy of the tied embedding: its summed grad
                torch.testing.assert_close(grads.pop("output_layer.weight"),
                                           base["grads"]["embedding.word_embeddings.weight"], atol=1e-5, rtol=1e-5)
            assert got["metrics"].keys() == base["metrics"].keys()
            for k, v in base["metrics"].items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (family, run, k)
            assert grads.keys() == base["grads"].keys(), (family, run)
            for name, g in base["grads"].items():
                assert g.abs().sum() > 0, f"{family}: zero reference grad for {name}"
                torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=f"{family} {run} {name}")
