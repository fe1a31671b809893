"""The planner's activation memory of megatron's local spec against what a real CPU forward keeps for its
backward, at two sequence lengths (so the per-token and the attention-score terms are both checked).

Measured: the bytes of every distinct storage autograd saves during the decoder's forward (parameters
excluded), i.e. what the activations hold when the backward starts. Qwen2 (GQA, QKV bias) and Qwen3
(QK norms, head_dim != hidden / heads); fp32, TP1 (the GPU / bf16 anchor waits for a GPU).
"""

from __future__ import annotations

import pytest

from trapo_megatron.testing import run_distributed

SEQS = (128, 512)
FAMILIES = ("qwen2", "qwen3")


def _saved_by_decoder(model, seq: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of ``model.decoder``."""
    import torch
    from _convert_helpers import causal_mask

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    pre = model.decoder.register_forward_pre_hook(lambda *_: hooks.__enter__())
    post = model.decoder.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    ids = torch.randint(0, model.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
    logits = model(ids, torch.arange(seq)[None], causal_mask(seq))
    pre.remove()
    post.remove()
    logits.sum().backward()  # the saved tensors were really used
    return sum(saved.values())


def _saved_bytes(rank: int, world: int) -> dict:
    from types import SimpleNamespace

    from _convert_helpers import hf_config

    from trapo_megatron.megatron import model_builder, platform

    parallel = platform.ParallelConfig()
    platform.initialize(parallel)
    out = {}
    for family in FAMILIES:
        cfg = hf_config(family, False, max_position_embeddings=max(SEQS))
        model = model_builder.build_model(SimpleNamespace(**cfg.to_dict()), parallel)[0]
        out.update({(family, seq): _saved_by_decoder(model, seq) for seq in SEQS})
    platform.destroy()
    return out


@pytest.mark.timeout(240)
def test_local_spec_activations_match_a_measured_forward() -> None:
    from _convert_helpers import hf_config

    from trapo_megatron.model_spec import from_hf_config
    from trapo_megatron.plan.memory import Layout, PlanConfig, stage_memory

    measured = run_distributed(_saved_bytes, 1, timeout=220)[0]
    for (family, seq), got in measured.items():
        spec = from_hf_config(hf_config(family, False))
        cfg = PlanConfig(num_gpus=1, gpus_per_node=1, precision="fp32", seq_length=seq, transformer_impl="local",
                         colocate_vllm=False)
        planned = stage_memory(spec, cfg, Layout(tp=1, pp=1, dp=1), 0).activations
        assert planned == pytest.approx(got, rel=0.15), (family, seq, planned, got)
    # the score term matters: it grows with the square of the sequence, the rest linearly
    assert measured[("qwen2", 512)] > 6 * measured[("qwen2", 128)]
