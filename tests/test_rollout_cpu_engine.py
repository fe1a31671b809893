"""The CPU twin engine: log-probs equal an independent forward, seeds reproduce, weights load strictly."""

import pytest
import torch
from rollout_tiny import tiny_qwen2_config

from trapo_megatron.rollout import RolloutEngine, SamplingParams
from trapo_megatron.rollout.cpu_engine import CpuEngine

VOCAB = 96
PROMPTS = [[5, 9, 11, 3], [7], [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return CpuEngine(tiny_qwen2_config(VOCAB))


def _full_forward_logprobs(model, prompt, gen, params):
    ids = torch.tensor([list(prompt) + gen.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
    scale = params.temperature if params.temperature > 0 else 1.0
    lp = torch.log_softmax(logits / scale, dim=-1)
    start = len(prompt) - 1
    return [float(lp[start + j, t]) for j, t in enumerate(gen.token_ids)]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_independent_forward(engine, temperature):
    params = [
        SamplingParams(temperature=temperature, max_tokens=12, seed=100 + i) for i in range(len(PROMPTS))
    ]
    outs = engine.generate(PROMPTS, params)
    for prompt, gen, p in zip(PROMPTS, outs, params):
        assert len(gen.token_ids) == len(gen.logprobs) == 12 and gen.finish_reason == "length"
        ref = _full_forward_logprobs(engine.model, prompt, gen, p)
        torch.testing.assert_close(torch.tensor(gen.logprobs), torch.tensor(ref), atol=1e-5, rtol=0)


def test_top_k_logprobs_are_of_the_truncated_distribution(engine):
    p = SamplingParams(temperature=1.0, top_k=5, max_tokens=6, seed=3)
    gen = engine.generate([PROMPTS[0]], [p])[0]
    ids = torch.tensor([PROMPTS[0] + gen.token_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0]
    for j, t in enumerate(gen.token_ids):
        row = logits[len(PROMPTS[0]) - 1 + j]
        top = torch.topk(row, 5)
        assert t in top.indices.tolist()
        ref = torch.log_softmax(top.values, -1)[top.indices.tolist().index(t)]
        assert abs(gen.logprobs[j] - float(ref)) < 1e-5


def test_seeds_reproduce_independently_of_the_batch(engine):
    params = [SamplingParams(max_tokens=10, seed=s) for s in (1, 2, 3)]
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    alone = engine.generate([PROMPTS[1]], [params[1]])[0]
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert alone.token_ids == a[1].token_ids
    other_seed = engine.generate([PROMPTS[1]], [SamplingParams(max_tokens=10, seed=99)])[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_token_ends_the_request(engine):
    greedy = engine.generate([PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=5)])[0]
    stop = greedy.token_ids[2]
    gen = engine.generate(
        [PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=5, stop_token_ids=(stop,))]
    )[0]
    first = greedy.token_ids.index(stop)
    assert gen.token_ids == greedy.token_ids[: first + 1] and gen.finish_reason == "stop"


def test_load_weights_is_strict_and_exact(engine):
    torch.manual_seed(1)
    src = CpuEngine(tiny_qwen2_config(VOCAB))
    stream = [
        (k, v.clone()) for k, v in src.model.state_dict().items() if k != "lm_head.weight"
    ]  # tied: no head
    engine.load_weights(iter(stream))
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(engine.model(input_ids=x).logits, src.model(input_ids=x).logits)
    with pytest.raises(KeyError, match="missing"):
        engine.load_weights(stream[1:])
    with pytest.raises(KeyError, match="unknown names \\['bogus'\\]"):
        engine.load_weights(stream + [("bogus", torch.zeros(1))])
    bad = [(k, v[:-1] if k == "model.norm.weight" else v) for k, v in stream]
    before = engine.model.model.embed_tokens.weight.clone()
    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.load_weights([(k, v + 1) if "embed" in k else (k, v) for k, v in bad])
    assert torch.equal(engine.model.model.embed_tokens.weight, before)  # nothing copied on error


def test_untied_model_needs_the_head():
    eng = CpuEngine(tiny_qwen2_config(VOCAB, tie=False))
    sd = eng.model.state_dict()
    with pytest.raises(KeyError, match="lm_head.weight"):
        eng.load_weights((k, v) for k, v in sd.items() if k != "lm_head.weight")


def test_from_pretrained_and_lifecycle(engine, tmp_path):
    engine.model.save_pretrained(tmp_path)
    loaded = CpuEngine.from_pretrained(str(tmp_path))
    assert isinstance(loaded, RolloutEngine)
    p = [SamplingParams(max_tokens=4, seed=7)]
    assert loaded.generate([PROMPTS[0]], p)[0].token_ids == engine.generate([PROMPTS[0]], p)[0].token_ids
    loaded.sleep()
    assert loaded.is_sleeping
    with pytest.raises(RuntimeError, match="sleeping"):
        loaded.generate([PROMPTS[0]], p)
    with pytest.raises(RuntimeError, match="refit with load_weights"):  # sleep discarded the weights (vLLM level 2)
        loaded.wake_up()
    loaded.load_weights(engine.model.state_dict().items())
    assert not loaded.is_sleeping
    loaded.wake_up()  # awake: nothing to do
    loaded.close()
    loaded.close()
