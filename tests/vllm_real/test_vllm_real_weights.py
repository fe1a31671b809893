"""Our live weight stream into vLLM's OWN models, real vllm 0.33.0 on CPU over gloo (world 2).

A Megatron model at TP=2 or PP=2 holds a Hugging Face checkpoint; the tensors ``iter_hf_weights`` yields go,
through the engine's ``engine_stream`` filter, into vLLM's Qwen2 / Llama / Qwen3 ``load_weights`` at vLLM TP=2
(vLLM shards the full tensors itself). Then every vLLM parameter shard equals the HF tensor(s) it came from
(fused qkv / gate_up, row- and vocab-parallel cuts computed here from the HF state dict), and vLLM's logits
(paged attention swapped for SDPA, see _vllm_real) equal the Megatron policy's at TP=2 and transformers' at
PP=2, to 1e-4 in fp32."""

import _vllm_real
import torch
from _convert_helpers import full_logits, hf_model, input_ids, save_hf

from trapo_megatron.testing import run_distributed

TOL = 1e-4
# (family, tied, Megatron layout): the families, tied and untied, TP=2 and PP=2 (Qwen3: q_norm / k_norm,
# head_dim != hidden / heads).
CASES = [("qwen2", False, "tp"), ("llama", True, "tp"), ("qwen2", True, "pp"), ("llama", False, "pp"),
         ("qwen3", False, "tp")]


def expected_shard(name: str, hf: dict[str, torch.Tensor], rank: int, tp: int, rows: int) -> torch.Tensor:
    """What vLLM rank ``rank`` of ``tp`` must hold for its parameter ``name`` (``rows``: its first dim)."""
    def cut(t, dim=0):
        return t.chunk(tp, dim=dim)[rank]

    base = name.rsplit(".", 1)[0]
    kind = name.rsplit(".", 1)[1]  # weight | bias
    if ".qkv_proj" in name:
        stem = base.replace("qkv_proj", "")
        return torch.cat([cut(hf[f"{stem}{p}_proj.{kind}"]) for p in "qkv"])
    if ".gate_up_proj" in name:
        stem = base.replace("gate_up_proj", "")
        return torch.cat([cut(hf[f"{stem}{p}_proj.{kind}"]) for p in ("gate", "up")])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return cut(hf[name], dim=1)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        full = hf.get(name, hf["model.embed_tokens.weight"])
        return full[rank * rows:(rank + 1) * rows]  # vocab padded per rank; the padding rows are not checked
    return hf[name]


def _megatron(cfg, hf_dir, layout):
    from megatron.core import parallel_state as ps

    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.megatron import model_builder, platform

    par = platform.ParallelConfig(**{"tp": {"tensor_model_parallel_size": 2},
                                     "pp": {"pipeline_model_parallel_size": 2}}[layout])
    platform.initialize(par)
    model = model_builder.build_model(cfg, par)
    load_hf_into_model(model, hf_dir, tp_group=ps.get_tensor_model_parallel_group())
    return model


def _worker(rank, world_size, cases, ids):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from trapo_megatron.convert.stream import iter_hf_weights
    from trapo_megatron.rollout.vllm_engine import engine_stream, external_launcher_env, llm_kwargs

    external_launcher_env()
    out = []
    for (family, tied, layout), hf_dir, hf_state, ref_logits in cases:
        cfg_hf = AutoConfig.from_pretrained(hf_dir)
        mcore = _megatron(cfg_hf, hf_dir, layout)
        kwargs = llm_kwargs(hf_dir, tensor_parallel_size=2, seed=0, gpu_memory_utilization=0.5, max_model_len=64,
                            enforce_eager=True, engine_kwargs=None)
        vcfg = _vllm_real.engine_config(_vllm_real.cpu_kwargs(kwargs))
        _vllm_real.init_parallel(vcfg, tp=2)
        vmodel = _vllm_real.build_model(vcfg)
        stream = iter_hf_weights(mcore, cfg_hf, tp_group=ps.get_tensor_model_parallel_group(),
                                 pp_group=ps.get_pipeline_model_parallel_group(), bucket_bytes=40_000)
        loaded = vmodel.load_weights(weights=engine_stream(stream, tied=tied, dtype=torch.float32))
        _vllm_real.finish_loading(vmodel, vcfg)
        params = dict(vmodel.named_parameters())
        bad = []
        for name, p in params.items():
            want = expected_shard(name, hf_state, rank, 2, p.shape[0])
            if not torch.equal(p.detach()[: want.shape[0]], want):
                bad.append(name)
        got = _vllm_real.logits(vmodel, vcfg, ids, cfg_hf.vocab_size)
        ref = full_logits(mcore, ids) if layout == "tp" else ref_logits
        out.append({"case": (family, tied, layout), "loaded": sorted(loaded), "params": sorted(params), "bad": bad,
                    "logits": (got - ref).abs().max().item(), "ref_vs_hf": (ref - ref_logits).abs().max().item()})
    return out


def test_stream_loads_through_vllm_models(tmp_path):
    ids = input_ids(96, batch=2)  # a length TP divides: Megatron runs sequence parallelism at TP 2
    cases = []
    for family, tied, layout in CASES:
        model = hf_model(family, tied)
        d = save_hf(model, tmp_path / f"{family}-{tied}-{layout}")
        with torch.no_grad():
            ref = model(ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        cases.append(((family, tied, layout), str(d), state, ref))
    # Workers forked from this process inherit vllm and megatron already imported (~20 s each otherwise).
    import megatron.core.models.gpt  # noqa: F401
    import vllm.model_executor.models.llama
    import vllm.model_executor.models.qwen2
    import vllm.model_executor.models.qwen3  # noqa: F401

    results = run_distributed(_worker, 2, cases, ids, timeout=600, start_method="fork")
    for rank_out in results:
        for r in rank_out:
            assert r["bad"] == [], r
            assert r["logits"] < TOL and r["ref_vs_hf"] < TOL, r
            fused = [n for n in r["params"] if "qkv_proj" in n or "gate_up_proj" in n]
            assert len(fused) >= 2 * 4, r["params"]  # every layer's fused projections were checked
            assert ("lm_head.weight" in r["params"]) != r["case"][1], r  # tied: vLLM shares the embedding
            assert set(r["loaded"]) >= set(r["params"]), set(r["params"]) - set(r["loaded"])
