"""The CPU twin engine and the Megatron policy agree: for the demo model's weights, the log-probs the engine
reports for its own samples equal the Megatron model's log-probs of the same tokens (TP=2, to 1e-4), after
the weights went Megatron -> live stream -> engine."""

from __future__ import annotations

import pytest
import torch

from trapo_megatron.commands.demo import ASSETS
from trapo_megatron.testing import run_distributed

pytestmark = pytest.mark.timeout(900)  # spawned Megatron worlds: slow on a loaded 2-core machine

PROMPTS = ["123+456=", "905+118=", "777+321="]


def parity_worker(rank: int, world: int) -> list[float]:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, AutoTokenizer

    from trapo_megatron.algo.masks import shift_labels
    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.convert.stream import iter_hf_weights
    from trapo_megatron.data.packing import pack_row
    from trapo_megatron.megatron import model_builder, platform, step
    from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs_entropy
    from trapo_megatron.rollout.cpu_engine import CpuEngine
    from trapo_megatron.rollout.engine import SamplingParams

    path = ASSETS / "model"
    parallel = platform.ParallelConfig(tensor_model_parallel_size=2)
    platform.initialize(parallel, seed=3)
    hf = AutoConfig.from_pretrained(path)
    chunks = model_builder.build_model(hf, parallel)
    load_hf_into_model(chunks, path, hf_config=hf, tp_group=ps.get_tensor_model_parallel_group())
    with torch.no_grad():  # move the policy off the checkpoint, so the engine only matches through the stream
        for p in chunks[0].parameters():
            p.add_(0.01 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(path)
    engine = CpuEngine.from_pretrained(str(path))
    engine.load_weights(iter_hf_weights(chunks, hf, tp_group=ps.get_tensor_model_parallel_group()))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(temperature=1.0, max_tokens=24, seed=i, stop_token_ids=(tok.eos_token_id,))
              for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    seqs = [torch.tensor(p + o.token_ids) for p, o in zip(prompts, outs)]
    mb = pack_row(seqs)
    mb["labels"] = torch.cat([shift_labels(s) for s in seqs])
    got: list[torch.Tensor] = []

    def loss_fn(logits, batch):
        logp, _ = vocab_parallel_logprobs_entropy(logits, batch["labels"], ps.get_tensor_model_parallel_group())
        got.append(logp.detach())
        return logp.sum() * 0, {}

    step.forward_backward(chunks, [mb], loss_fn, forward_only=True)
    diffs, offset = [], 0
    for p, o, s in zip(prompts, outs, seqs):
        start = offset + len(p) - 1  # position predicting the first generated token
        megatron_lp = got[0][start:start + len(o.token_ids)]
        diffs.extend((megatron_lp - torch.tensor(o.logprobs)).abs().tolist())
        offset += len(s)
    platform.destroy()
    return diffs


def test_cpu_twin_logprobs_equal_megatron() -> None:
    diffs = run_distributed(parity_worker, 2)
    assert diffs[0] == diffs[1]  # both TP ranks see the same
    assert len(diffs[0]) >= 3 * 5
    assert max(diffs[0]) < 1e-4, max(diffs[0])
