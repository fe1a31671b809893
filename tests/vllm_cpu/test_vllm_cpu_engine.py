"""VllmEngine on vLLM's CPU build, in this process (world 1): construction, refit through vLLM's in-place
reload, generate, sleep, close. The oracle is transformers: the engine's log-probs of its sampled tokens equal
the Hugging Face model's recomputed ones, after the first refit and after a second with other weights (tied
and untied heads), and greedy decoding equals the CPU twin's."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _vllm_cpu import sequence_logprobs, untied_demo_model

from trapo_megatron.commands.demo import ASSETS
from trapo_megatron.rollout import SamplingParams
from trapo_megatron.rollout.cpu_engine import CpuEngine
from trapo_megatron.rollout.vllm_engine import VllmEngine

pytestmark = pytest.mark.timeout(600)

PROMPTS = [[5, 17, 30, 9], [40, 41], [7, 8, 9, 10, 11, 12]]


def _perturbed(model, seed: int):
    """Other weights of the same shapes: the second refit must replace every one of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_bad_engine_kwargs_are_named_before_vllm_starts() -> None:
    with pytest.raises(ValueError, match=r"\['max_num_seq'\] are not vLLM engine arguments"):
        VllmEngine(str(ASSETS / "model"), engine_kwargs={"max_num_seq": 4})


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_refits_reach_the_engine_and_it_samples_like_transformers(tied: bool, tmp_path, capfd) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = ASSETS / "model" if tied else untied_demo_model(tmp_path / "untied")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings is tied
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected_rng = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    engine = VllmEngine(str(model_dir), seed=5, max_model_len=64, enforce_eager=True,
                        engine_kwargs={"max_num_seqs": 8})
    got_rng = (random.random(), np.random.rand(), torch.rand(3))  # vLLM reseeds this process; restored
    assert got_rng[:2] == expected_rng[:2] and torch.equal(got_rng[2], expected_rng[2])
    assert capfd.readouterr().err.count("has no sleep mode") == 1  # said once, in the rank's log
    assert engine.dtype == torch.float32 and engine.tied is tied

    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=100 + i) for i in range(len(PROMPTS))]
    for refit in range(2):
        if refit:
            _perturbed(hf, seed=refit)
        engine.sleep()
        with pytest.raises(RuntimeError, match="sleeping"):
            engine.generate(PROMPTS, params)
        engine.load_weights(iter(hf.state_dict().items()))
        outs = engine.generate(PROMPTS, params)
        gaps = [abs(a - b) for p, o in zip(PROMPTS, outs)
                for a, b in zip(o.logprobs, sequence_logprobs(hf, p, o.token_ids))]
        assert max(gaps) < 1e-4, (refit, max(gaps))
        assert sum(len(o.token_ids) for o in outs) > len(PROMPTS)  # not collapsed to one token (a stale head)
        assert engine.generate(PROMPTS, params) == outs  # per-request seeds: the same samples again
        greedy = [SamplingParams(temperature=0.0, max_tokens=8, seed=0)] * len(PROMPTS)
        twin = CpuEngine(model=hf).generate(PROMPTS, greedy)
        assert [o.token_ids for o in engine.generate(PROMPTS, greedy)] == [o.token_ids for o in twin]
    assert engine.num_generate_calls == 6
    engine.close()
    engine.close()  # idempotent
