"""A Megatron model loaded from a Hugging Face checkpoint (directly or through the converted distributed
checkpoint) gives the transformers logits at TP=1, TP=2 and PP=2, and the live weight stream returns the HF
state dict exactly. Spawned world-2 runs: TP=1 then TP=2 (Qwen2 untied with QKV bias; Qwen3 with QK norms
and head_dim != hidden / heads) and PP=2 (tied: the last stage holds a copy of the embedding; Llama with
Llama 3.1's RoPE scaling, Qwen3)."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from _convert_helpers import LLAMA3_ROPE, causal_mask, full_logits, hf_config, hf_model, input_ids, save_hf

from trapo_megatron.convert import hf_io
from trapo_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from trapo_megatron.convert.mcore_to_hf import convert_mcore_to_hf
from trapo_megatron.testing import run_distributed

TOL = 1e-4


def _plain(config):
    """The HF config as a namespace: workers then need not import transformers (~2 s each)."""
    return SimpleNamespace(**config.to_dict())


def _stream_mismatches(model, cfg, ref_state, bucket_bytes):
    from megatron.core import parallel_state as ps

    from trapo_megatron.convert.stream import iter_hf_buckets

    seen, bad, buckets = set(), [], 0
    for bucket in iter_hf_buckets(model, cfg, tp_group=ps.get_tensor_model_parallel_group(),
                                  pp_group=ps.get_pipeline_model_parallel_group(), bucket_bytes=bucket_bytes):
        buckets += 1
        for name, tensor in bucket:
            if name in seen or name not in ref_state or not torch.equal(tensor, ref_state[name]):
                bad.append(name)
            seen.add(name)
    return bad + sorted(set(ref_state) - seen), buckets


def _tp_worker(rank, world_size, cfg, hf_dir, mcore_dir, save_dir, ids, ref_logits, ref_state):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.megatron import model_builder, platform

    out = {}
    par = platform.ParallelConfig()  # TP=1, DP=2: each rank holds the whole model
    platform.initialize(par)
    model = model_builder.build_model(cfg, par)
    load_hf_into_model(model, hf_dir, tp_group=ps.get_tensor_model_parallel_group())
    out["tp1_logits"] = (full_logits(model, ids) - ref_logits).abs().max().item()
    out["tp1_stream"] = _stream_mismatches(model, cfg, ref_state, bucket_bytes=2**30)

    par = platform.ParallelConfig(tensor_model_parallel_size=2)
    platform.initialize(par)
    model = model_builder.build_model(cfg, par)
    model[0].load_state_dict(dist_checkpointing.load(model[0].sharded_state_dict(), mcore_dir))
    out["tp2_logits"] = (full_logits(model, ids) - ref_logits).abs().max().item()
    out["tp2_stream"] = _stream_mismatches(model, cfg, ref_state, bucket_bytes=40_000)
    direct = model_builder.build_model(cfg, par)
    load_hf_into_model(direct, hf_dir, tp_group=ps.get_tensor_model_parallel_group())
    out["tp2_direct_vs_ckpt"] = [n for (n, a), (_, b) in zip(model[0].named_parameters(), direct[0].named_parameters())
                                 if not torch.equal(a, b)]
    _save(model, save_dir)  # a TP=2 checkpoint as training writes it
    platform.destroy()
    return out


def _save(model, save_dir):
    """megatron's checkpoint writer starts a multiprocessing Manager, which a daemonic worker may not: this
    worker is the only process that needs to, so it stops being daemonic."""
    import multiprocessing

    from megatron.core import dist_checkpointing

    multiprocessing.current_process().daemon = False
    dist_checkpointing.save(model[0].sharded_state_dict(), save_dir)


def _prepare(tmp_path, family, tied, seq=12, **overrides):
    """HF checkpoint + its converted Megatron checkpoint; the worker arguments with reference logits/state
    (``seq``: a length TP 2 divides, for sequence parallelism)."""
    model = hf_model(family, tied=tied, **overrides)
    hf_dir = save_hf(model, tmp_path / "hf")
    convert_hf_to_mcore(hf_dir, tmp_path / "mcore")
    ids = input_ids(model.config.vocab_size, seq=seq)
    with torch.no_grad():
        ref_logits = model(ids).logits
    ref_state = {k: v.clone() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    return hf_dir, (_plain(model.config), str(hf_dir), str(tmp_path / "mcore")), (ids, ref_logits, ref_state)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tp1_tp2_logits_and_stream(tmp_path, family):
    hf_dir, head, (ids, ref_logits, ref_state) = _prepare(tmp_path, family, tied=False)
    (tmp_path / "saved").mkdir()
    results = run_distributed(_tp_worker, 2, *head, str(tmp_path / "saved"), ids, ref_logits, ref_state, timeout=300)
    for out in results:
        assert out["tp1_logits"] < TOL and out["tp2_logits"] < TOL, out
        assert out["tp1_stream"] == ([], 1), out["tp1_stream"]
        assert out["tp2_stream"][0] == [] and out["tp2_stream"][1] > 3, out["tp2_stream"]
        assert out["tp2_direct_vs_ckpt"] == []
    _assert_exports_to(tmp_path / "saved", tmp_path / "out", hf_dir, ref_state)


def _assert_exports_to(saved, out, hf_dir, ref_state):
    """The checkpoint megatron saved exports to the original HF tensors, bit for bit."""
    convert_mcore_to_hf(saved, out, hf_config_dir=hf_dir)
    exported = hf_io.HFSource(out)
    assert set(exported.shapes()) == set(ref_state)
    assert all(torch.equal(exported.get(k), v) for k, v in ref_state.items())


def _pp_worker(rank, world_size, cfg, hf_dir, mcore_dir, ids, ref_logits, ref_state, inv_freq, split, save_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.megatron import model_builder, platform

    par = platform.ParallelConfig(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=split[0],
                                  num_layers_in_last_pipeline_stage=split[1])
    platform.initialize(par)
    model = model_builder.build_model(cfg, par)
    load_hf_into_model(model, hf_dir, tp_group=ps.get_tensor_model_parallel_group())
    pos, mask = torch.arange(ids.shape[1]).expand_as(ids), causal_mask(ids.shape[1])
    out = {"inv_freq": (model[0].rotary_pos_emb.inv_freq.cpu() - inv_freq).abs().max().item()}
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            hidden = model[0](ids, pos, mask)  # (s, b, h)
            dist.send(hidden.contiguous(), dst=1)
        else:
            hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.hidden_size, device=platform.device())
            dist.recv(hidden, src=0)
            model[0].set_input_tensor(hidden)
            out["logits"] = (model[0](ids, pos, mask) - ref_logits).abs().max().item()
    out["stream"] = _stream_mismatches(model, cfg, ref_state, bucket_bytes=30_000)
    from_ckpt = model_builder.build_model(cfg, par)
    from_ckpt[0].load_state_dict(dist_checkpointing.load(from_ckpt[0].sharded_state_dict(), mcore_dir))
    out["ckpt_vs_direct"] = [n for (n, a), (_, b) in zip(model[0].named_parameters(),
                                                          from_ckpt[0].named_parameters()) if not torch.equal(a, b)]
    out["layers"] = len(model[0].decoder.layers)
    _save(model, save_dir)
    platform.destroy()
    return out


# Llama 3.1's RoPE scaling changes the slow frequencies only: its logits differ from unscaled RoPE's by 5e-4
# at 512 tokens (8e-6 at 9); the rotary frequencies themselves are compared too. Both on uneven stages:
# (layers, first-stage layers, last-stage layers).
@pytest.mark.parametrize("family,seq,overrides,stages", [
    ("llama", 512, LLAMA3_ROPE, (3, None, 1)), ("qwen3", 9, {}, (5, 1, None))], ids=["llama3-rope", "qwen3"])
def test_pp2_tied_logits_and_stream(tmp_path, family, seq, overrides, stages):
    from transformers import AutoModelForCausalLM

    layers, *split = stages
    hf_dir, head, (ids, ref_logits, ref_state) = _prepare(tmp_path, family, tied=True, seq=seq,
                                                          num_hidden_layers=layers, **overrides)
    inv_freq = AutoModelForCausalLM.from_pretrained(hf_dir).model.rotary_emb.inv_freq
    (tmp_path / "saved").mkdir()
    first, last = run_distributed(_pp_worker, 2, *head, ids, ref_logits, ref_state, inv_freq, split,
                                  str(tmp_path / "saved"), timeout=300)
    assert last["logits"] < TOL, last
    assert [first["layers"], last["layers"]] == [split[0] or layers - split[1], split[1] or layers - split[0]]
    _assert_exports_to(tmp_path / "saved", tmp_path / "out", hf_dir, ref_state)
    for out in (first, last):
        assert out["inv_freq"] < 1e-9, out["inv_freq"]
        assert out["stream"][0] == [] and out["stream"][1] > 2, out["stream"]
        assert out["ckpt_vs_direct"] == []


def _tp2pp2_worker(rank, world_size, cfg, hf_dir, mcore_dir, ids, ref_logits, ref_state):
    from megatron.core import parallel_state as ps

    from trapo_megatron import model_spec
    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.convert.stream import bytes_per_rank
    from trapo_megatron.megatron import model_builder, platform

    par = platform.ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    platform.initialize(par)
    model = model_builder.build_model(cfg, par)
    load_hf_into_model(model, hf_dir, tp_group=ps.get_tensor_model_parallel_group())
    received = {"across_stages": 0, "within_stage": 0}
    broadcast, gather = dist.broadcast, dist.all_gather_into_tensor
    pp_rank = ps.get_pipeline_model_parallel_rank()

    def counting_broadcast(tensor, *args, group_src=None, **kwargs):
        received["across_stages"] += tensor.numel() * tensor.element_size() if group_src != pp_rank else 0
        return broadcast(tensor, *args, group_src=group_src, **kwargs)

    def counting_gather(out, local, *args, **kwargs):
        received["within_stage"] += (out.numel() - local.numel()) * out.element_size()
        return gather(out, local, *args, **kwargs)

    dist.broadcast, dist.all_gather_into_tensor = counting_broadcast, counting_gather
    try:
        stream = _stream_mismatches(model, cfg, ref_state, bucket_bytes=30_000)
    finally:
        dist.broadcast, dist.all_gather_into_tensor = broadcast, gather
    itemsize = next(model[0].parameters()).element_size()
    expected = bytes_per_rank(model_spec.from_hf_config(vars(cfg)), 2, 2, pp_rank, itemsize)
    platform.destroy()
    return {"stream": stream, "received": received, "expected": expected}


def test_tp2_pp2_stream_moves_tp_shards_across_stages(tmp_path):
    """World 4: the stream is exact, and each rank receives what bytes_per_rank counts: another stage's TP
    shards across stages (half of what broadcasting full tensors moved), every shard of its TP peers within."""
    _, head, tail = _prepare(tmp_path, "qwen2", tied=False)
    for out in run_distributed(_tp2pp2_worker, 4, *head, *tail, timeout=300):
        assert out["stream"][0] == [] and out["stream"][1] > 2, out["stream"]
        assert out["received"] == out["expected"]
        assert out["received"]["across_stages"] > 0


def test_buckets_respect_the_budget_and_stage_boundaries():
    from trapo_megatron import model_spec
    from trapo_megatron.convert import mapping
    from trapo_megatron.convert.stream import _buckets, _Group

    dims = model_spec.from_hf_config(hf_config("qwen2", False).to_dict())
    walk = list(mapping.walk(dims))
    half = dims.num_layers // 2  # PP=2 layout: stage 1 owns the second half of the layers and the output
    groups = [_Group(i, int(layer is not None and layer >= half or e.mcore.startswith(("decoder.final", "output"))),
                     mapping.mcore_shape(e, dims), torch.float32) for i, (e, layer) in enumerate(walk)]
    budget = 60_000
    buckets = _buckets(groups, walk, tp_size=2, pp_size=2, bucket_bytes=budget, gather_temp=True)
    assert [g for b in buckets for g in b] == groups
    for bucket in buckets:
        assert len({g.owner for g in bucket}) == 1
        cost = sum(g.cost(walk[g.order][0], 2, 2, True) for g in bucket)
        assert cost <= budget or len(bucket) == 1
