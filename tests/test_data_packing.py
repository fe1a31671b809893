"""Packing: micro-batches carry boundaries only (no S x S mask kept per micro-batch); the local path's mask
is built from them and equals the brute-force block-diagonal causal mask; the THD path builds none."""

import dataclasses

import pytest
import torch

from trapo_megatron.data.packing import block_causal_mask, pack_row
from trapo_megatron.testing import run_distributed


def test_a_packed_row_is_linear_in_its_tokens():
    """At the 7B preset's 16,384 tokens a dense mask was 268 MB per micro-batch; a row is now O(S)."""
    seqs = [torch.arange(n) for n in (8192, 4096, 4096)]
    row = pack_row(seqs)
    assert set(row) == {"tokens", "position_ids", "cu_seqlens"}
    assert sum(t.numel() * t.element_size() for t in row.values()) < 20 * 16_384  # bytes: ~16 per token
    assert row["cu_seqlens"].tolist() == [0, 8192, 12288, 16384]
    assert row["position_ids"][0, 8192].item() == 0 and row["position_ids"][0, -1].item() == 4095


def test_block_causal_mask_is_the_brute_force_one():
    lengths = [3, 1, 4]
    row = pack_row([torch.zeros(n, dtype=torch.long) for n in lengths])
    seq_of = [i for i, n in enumerate(lengths) for _ in range(n)]
    total = sum(lengths)
    want = torch.tensor([[not (seq_of[i] == seq_of[j] and j <= i) for j in range(total)] for i in range(total)])
    assert torch.equal(block_causal_mask(row["cu_seqlens"]), want.view(1, 1, total, total))


def _step_worker(rank, world_size, thd):
    from trapo_megatron.convert.model_io import load_hf_into_model  # noqa: F401 - megatron import order
    from trapo_megatron.data import packing
    from trapo_megatron.megatron import model_builder, platform, step

    par = platform.ParallelConfig()
    platform.initialize(par)
    from _megatron_helpers import tiny_hf_config

    cfg = tiny_hf_config("qwen2")
    chunks = model_builder.build_model(cfg, par)
    real = chunks[0]
    seen, built = [], []
    orig_mask = packing.block_causal_mask

    def counting_mask(cu, device):
        built.append(int(cu[-1]))
        return orig_mask(cu, device)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.model_type = real, real.config, real.model_type
            self.trapo_features = real.trapo_features

        def forward(self, tokens, position_ids, mask, labels=None, packed_seq_params=None):
            seen.append((mask is None, packed_seq_params is not None))
            if mask is None:  # stand in for TE's THD attention with the same boundaries
                mask = orig_mask(packed_seq_params.cu_seqlens_q, tokens.device)
            return self.inner(tokens, position_ids, mask, labels=labels)

        def set_input_tensor(self, t):
            self.inner.set_input_tensor(t)

    packing.block_causal_mask = counting_mask
    real.trapo_features = dataclasses.replace(real.trapo_features, transformer_engine=thd)
    mb = pack_row([torch.arange(5), torch.arange(3)])
    step.forward_backward([Recorder()], [mb], lambda logits, b: (logits.sum() * 0, {}), forward_only=True)
    platform.destroy()
    return seen, built


@pytest.mark.parametrize("thd", [True, False])
def test_thd_passes_no_mask_and_builds_none(thd):
    (seen, built), = run_distributed(_step_worker, 1, thd, timeout=240)
    if thd:  # Transformer Engine: boundaries only, no dense mask anywhere
        assert seen == [(True, True)] and built == []
    else:  # local spec: the mask built once, for this forward
        assert seen == [(False, False)] and built == [8]
