"""Packing: micro-batches carry boundaries only (no S x S mask kept per micro-batch); the local path's mask
is built from them and equals the brute-force block-diagonal causal mask; the THD path builds none."""

import dataclasses

import pytest
import torch

from trapo_megatron.data.packing import block_causal_mask, pack_row, pad_row
from trapo_megatron.testing import run_distributed


def test_a_packed_row_is_linear_in_its_tokens():
    """At the 7B preset's 16,384 tokens a dense mask was 268 MB per micro-batch; a row is now O(S)."""
    seqs = [torch.arange(n) for n in (8192, 4096, 4096)]
    row = pack_row(seqs)
    assert set(row) == {"tokens", "position_ids", "cu_seqlens", "max_seqlen"}
    assert row["max_seqlen"] == 8192  # a host int: THD attention needs it without a device sync
    assert sum(t.numel() * t.element_size() for t in row.values() if isinstance(t, torch.Tensor)) < 20 * 16_384
    assert row["cu_seqlens"].tolist() == [0, 8192, 12288, 16384]
    assert row["position_ids"][0, 8192].item() == 0 and row["position_ids"][0, -1].item() == 4095


def test_padding_is_a_pseudo_sequence_of_its_own_carrying_nothing():
    """Sequence parallelism scatters the row over TP ranks: megatron asserts S % TP == 0
    (tensor_parallel/mappings.py _split_along_first_dim). The padding closes its own cu_seqlens entry."""
    row = pack_row([torch.arange(1, 6), torch.arange(1, 3)])  # 7 tokens
    row.update(labels=torch.arange(7), sft_mask=torch.ones(7, dtype=torch.bool), token_weight=torch.ones(7))
    for tp, padded in ((1, 7), (2, 8), (4, 8), (8, 8), (3, 9)):
        out = pad_row(row, tp, {"labels": -100})
        assert out["tokens"].shape == out["position_ids"].shape == (1, padded)
        assert all(out[k].shape == (padded,) for k in ("labels", "sft_mask", "token_weight"))
        assert out["tokens"].shape[1] % tp == 0 and int(out["cu_seqlens"][-1]) == padded
        if padded > 7:
            pad = padded - 7
            assert out["cu_seqlens"].tolist() == [0, 5, 7, padded] and out["max_seqlen"] == 5
            assert out["position_ids"][0, 7:].tolist() == list(range(pad))
            assert out["labels"][7:].tolist() == [-100] * pad and not out["sft_mask"][7:].any()
            assert out["token_weight"][7:].sum() == 0 and out["tokens"][0, :7].tolist() == [1, 2, 3, 4, 5, 1, 2]
            mask = block_causal_mask(out["cu_seqlens"])[0, 0]
            assert mask[7:, :7].all() and mask[:7, 7:].all()  # attention never crosses into or out of it
        else:
            assert out is row


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
