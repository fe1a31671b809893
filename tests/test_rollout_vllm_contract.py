"""The vLLM engine's contract on CPU: a fake `vllm` module records what the engine asks of vLLM."""

import random
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trapo_megatron.rollout import SamplingParams
from trapo_megatron.rollout.vllm_engine import NOT_INSTALLED, VllmEngine


class _FakeModel:
    def __init__(self, log):
        self.log = log

    def load_weights(self, weights):
        items = list(weights)  # vLLM consumes the iterator
        self.log.append(("load_weights", [(n, t.dtype) for n, t in items]))


class _FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.log = kwargs, []
        random.seed(123), np.random.seed(123), torch.manual_seed(123)  # vLLM's set_random_seed does this
        model = _FakeModel(self.log)
        worker = SimpleNamespace(get_model=lambda: model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker)),
            model_config=SimpleNamespace(hf_config=SimpleNamespace(tie_word_embeddings=True)),
        )
        _FakeLLM.instances.append(self)

    def sleep(self, level=1):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.log.append(("generate", prompts, sampling_params, use_tqdm))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            toks = [p["prompt_token_ids"][-1] + 1, 2]
            lps = [{t: SimpleNamespace(logprob=-0.5 * (i + 1))} for i, t in enumerate(toks)]
            outs.append(
                SimpleNamespace(outputs=[SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason="stop")])
            )
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: dict(kw)
    mod.TokensPrompt = lambda **kw: dict(kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _FakeLLM.instances.clear()
    return mod


def test_without_vllm_the_module_imports_and_use_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RuntimeError, match=r"vLLM is not installed \(pip install 'trapo-megatron\[gpu\]'\)"):
        VllmEngine("/some/model")
    assert "pip install" in NOT_INSTALLED


def test_construction_arguments_and_rng_restored(fake_vllm):
    random.seed(7), np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7), np.random.seed(7)
    VllmEngine("/m", seed=5, max_model_len=2048)  # the fake reseeds python/numpy/torch like vLLM does
    assert (random.random(), np.random.rand()) == expected
    kw = _FakeLLM.instances[0].kwargs
    assert kw["model"] == "/m" and kw["seed"] == 5 and kw["max_model_len"] == 2048
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"] is True and kw["dtype"] == "bfloat16"
    assert kw["enable_sleep_mode"] is True and kw["enable_prefix_caching"] is True
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert "distributed_executor_backend" not in kw


def test_torch_rng_restored(fake_vllm):
    torch.manual_seed(7)
    a = torch.rand(3)
    torch.manual_seed(7)
    VllmEngine("/m")
    assert torch.equal(torch.rand(3), a)


def test_external_launcher_under_torchrun(fake_vllm, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    VllmEngine("/m", tensor_parallel_size=2)
    kw = _FakeLLM.instances[0].kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 2


def test_refit_order_dtype_and_tied_head(fake_vllm):
    eng = VllmEngine("/m")
    log = _FakeLLM.instances[0].log
    eng.sleep()
    eng.sleep()  # idempotent
    assert eng.is_sleeping
    stream = (
        (n, torch.ones(2, dtype=torch.float32))
        for n in ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    )
    eng.load_weights(stream)
    assert [e[0] for e in log] == ["sleep", "wake_up", "load_weights", "wake_up", "reset_prefix_cache"]
    assert (
        log[1] == ("wake_up", ["weights"]) and log[3] == ("wake_up", ["kv_cache"]) and log[0] == ("sleep", 1)
    )
    assert log[2][1] == [
        ("model.embed_tokens.weight", torch.bfloat16),
        ("model.layers.0.mlp.up_proj.weight", torch.bfloat16),
    ]
    assert not eng.is_sleeping
    log.clear()
    eng.load_weights([("model.norm.weight", torch.ones(2))])  # awake: no wake calls, prefix cache still reset
    assert [e[0] for e in log] == ["load_weights", "reset_prefix_cache"]


def test_generate_requests(fake_vllm):
    eng = VllmEngine("/m")
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, top_k=0, max_tokens=16, seed=s, stop_token_ids=(2,))
        for s in (11, 12)
    ]
    outs = eng.generate([[5, 6], [7]], params)
    _, prompts, sps, use_tqdm = _FakeLLM.instances[0].log[-1]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}] and use_tqdm is False
    assert [sp["seed"] for sp in sps] == [11, 12]
    assert all(
        sp["logprobs"] == 0
        and sp["stop_token_ids"] == [2]
        and sp["n"] == 1
        and sp["detokenize"] is False
        and sp["temperature"] == 0.9
        and sp["top_p"] == 0.95
        and sp["max_tokens"] == 16
        for sp in sps
    )
    assert (
        outs[0].token_ids == [7, 2] and outs[0].logprobs == [-0.5, -1.0] and outs[0].finish_reason == "stop"
    )
    assert eng.num_generate_calls == 1
    eng.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        eng.generate([[1]], params[:1])
    eng.wake_up()
    assert _FakeLLM.instances[0].log[-1] == ("wake_up", None)
    eng.close()
    eng.close()
