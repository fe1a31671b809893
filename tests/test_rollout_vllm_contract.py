"""The vLLM engine's calls that need a GPU (LLM construction, generate, sleep / wake, shutdown), checked on
CPU against a fake ``vllm`` module. Everything that runs on CPU is checked against the REAL vllm 0.33.0 in
tests/vllm_real (keywords as EngineArgs, the engine config, SamplingParams, stop ids, load_weights, logits).

What the fake encodes, from the vllm 0.33.0 source (paths relative to the package):
- ``LLM.__init__`` reseeds python/numpy/torch (utils set_random_seed, called by the worker at init).
- ``LLM.sleep(level=2)`` discards weights and KV cache; ``wake_up(tags=["weights"])`` reallocates the weight
  memory (its contents undefined until load_weights), ``wake_up(tags=["kv_cache"])`` the KV cache
  (entrypoints/llm.py LLM.sleep / wake_up docstrings; v1/worker/gpu_worker.py Worker.sleep / wake_up).
- the in-process model: ``llm.llm_engine.model_executor.driver_worker.worker.get_model()`` (v1/engine/
  llm_engine.py sets model_executor when not multiprocess; v1/executor/uniproc_executor.py driver_worker).
- ``reset_prefix_cache()`` after a weight update (a weight update does not reset it).
- ``generate(prompts, sampling_params, use_tqdm=False)`` returns RequestOutputs in input order, with
  ``outputs[0].token_ids / logprobs[i][token].logprob / finish_reason`` (outputs.py CompletionOutput).
- shutdown of the in-process engine: ``llm.llm_engine.engine_core.shutdown()`` (v1/engine/core_client.py
  InprocClient.shutdown).
"""

import random
import sys
import types
from types import SimpleNamespace
from typing import ClassVar

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
    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs, self.log = kwargs, []
        random.seed(123), np.random.seed(123), torch.manual_seed(123)  # vLLM's set_random_seed does this
        model = _FakeModel(self.log)
        worker = SimpleNamespace(get_model=lambda: model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker)),
            model_config=SimpleNamespace(hf_config=SimpleNamespace(tie_word_embeddings=True)),
            engine_core=SimpleNamespace(shutdown=lambda: self.log.append(("shutdown",))),
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
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so what the engine sets is undone after the test
        monkeypatch.delenv(key)
    _FakeLLM.instances.clear()
    return mod


def test_without_vllm_the_module_imports_and_use_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RuntimeError, match=r"vLLM is not installed \(pip install 'trapo-megatron\[gpu\]'\)"):
        VllmEngine("/some/model")
    assert "pip install" in NOT_INSTALLED


def test_rng_restored_and_external_launcher_at_world_one(fake_vllm):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    VllmEngine("/m", seed=5, max_model_len=2048)  # the fake reseeds python/numpy/torch like vLLM does
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    # world of 1 too (bug 1): the in-process engine, and the launcher variables a plain run lacks
    assert _FakeLLM.instances[0].kwargs["distributed_executor_backend"] == "external_launcher"
    import os

    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")


def test_sleep_discards_and_refit_wakes_weights_then_kv_cache(fake_vllm):
    eng = VllmEngine("/m")
    log = _FakeLLM.instances[0].log
    eng.sleep()
    eng.sleep()  # idempotent
    assert eng.is_sleeping and log == [("sleep", 2)]  # level 2: nothing copied to host (bug 3)
    with pytest.raises(RuntimeError, match="refit with load_weights"):
        eng.wake_up()  # the weights are gone: a wake without a refit would generate from discarded memory
    stream = (
        (n, torch.ones(2, dtype=torch.float32))
        for n in ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    )
    eng.load_weights(stream)
    assert log[1:] == [("wake_up", ["weights"]), log[2], ("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]
    assert log[2] == ("load_weights", [("model.embed_tokens.weight", torch.bfloat16),
                                       ("model.layers.0.mlp.up_proj.weight", torch.bfloat16)])  # tied: no head
    assert not eng.is_sleeping
    log.clear()
    eng.wake_up()  # awake: nothing to do
    eng.load_weights([("model.norm.weight", torch.ones(2))])  # awake: no wake calls, prefix cache still reset
    assert [e[0] for e in log] == ["load_weights", "reset_prefix_cache"]


def test_generate_requests_and_shutdown(fake_vllm):
    eng = VllmEngine("/m")
    params = [
        SamplingParams(temperature=0.9, top_p=0.95, top_k=0, max_tokens=16, seed=s, stop_token_ids=(2,))
        for s in (11, 12)
    ]
    outs = eng.generate([[5, 6], [7]], params)
    log = _FakeLLM.instances[0].log
    _, prompts, sps, use_tqdm = log[-1]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}] and use_tqdm is False
    assert [sp["seed"] for sp in sps] == [11, 12]
    assert (
        outs[0].token_ids == [7, 2] and outs[0].logprobs == [-0.5, -1.0] and outs[0].finish_reason == "stop"
    )
    assert eng.num_generate_calls == 1
    eng.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        eng.generate([[1]], params[:1])
    eng.close()
    eng.close()  # idempotent
    assert log[-1] == ("shutdown",) and [e[0] for e in log].count("shutdown") == 1  # bug 4
