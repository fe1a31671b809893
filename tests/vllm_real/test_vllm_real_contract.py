"""The engine's contract with vLLM, against the REAL vllm 0.33.0 (run in .venv-vllm by `make test`).

What runs on CPU without vLLM's kernels: the keywords of ``LLM(...)`` as EngineArgs, the engine config they
build, our SamplingParams as vLLM's, the generation-config stop ids vLLM adds, and the API our refit,
sleep and shutdown paths call (its behaviour on GPU is cited in tests/test_rollout_vllm_contract.py)."""

import dataclasses
import importlib.metadata
import inspect
import json

import _vllm_real  # noqa: F401 - sets VLLM_TARGET_DEVICE=cpu before vllm is imported
import pytest
import torch
import vllm
from _convert_helpers import hf_model, save_hf
from _vllm_real import cpu_kwargs, engine_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trapo_megatron.rollout import SamplingParams
from trapo_megatron.rollout.vllm_engine import external_launcher_env, llm_kwargs, vllm_sampling
from trapo_megatron.rollout.waves import RolloutConfig, stop_token_ids

EOS, IM_END, ENDOFTEXT = 5, 7, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 folder whose generation_config.json lists two eos ids (as Qwen2.5-Instruct's does), and
    a word-level tokenizer whose own EOS is a third id."""
    d = tmp_path_factory.mktemp("qwen2")
    save_hf(hf_model("qwen2", False), d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [IM_END, ENDOFTEXT]}))
    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"w{EOS}").save_pretrained(d)
    return d


def _our_kwargs(model_dir, **overrides):
    base = {"tensor_parallel_size": 1, "seed": 3, "gpu_memory_utilization": 0.5, "max_model_len": 64,
            "enforce_eager": True, "engine_kwargs": None}
    return llm_kwargs(str(model_dir), **{**base, **overrides})


def test_the_installed_vllm_is_the_pinned_one():
    assert importlib.metadata.version("vllm") == "0.33.0"


def test_every_llm_keyword_is_an_engine_arg_and_the_config_builds(model_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = _our_kwargs(model_dir)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(kwargs) - {"model"} <= fields, set(kwargs) - fields
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(key, raising=False)
    external_launcher_env()  # a plain one-process run: the single-rank launcher variables
    cfg = engine_config(cpu_kwargs(kwargs))
    assert cfg.parallel_config.distributed_executor_backend == "external_launcher"
    assert cfg.parallel_config.tensor_parallel_size == 1 and cfg.model_config.seed == 3
    assert cfg.model_config.max_model_len == 64 and cfg.cache_config.enable_prefix_caching
    assert cfg.load_config.load_format == "dummy" and cfg.model_config.skip_tokenizer_init
    assert cfg.model_config.logprobs_mode == "processed_logprobs"
    # Bug 1: an engine without external_launcher at world 1 got the multiprocess engine core, which has no
    # llm_engine.model_executor; external_launcher turns multiprocessing off (what LLMEngine reads).
    from vllm import envs

    assert envs.VLLM_ENABLE_V1_MULTIPROCESSING is False
    # bf16 (the engine's dtype) builds too; sleep mode is CUDA-only (rejected on CpuPlatform): a field only.
    assert engine_config({**cpu_kwargs(kwargs), "dtype": "bfloat16"}).model_config.dtype == torch.bfloat16


def test_a_multi_rank_world_without_torchrun_variables_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        external_launcher_env()


def test_our_sampling_params_are_vllms():
    ours = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_tokens=12, seed=42, stop_token_ids=(2, 9))
    sp = vllm_sampling(vllm, ours)
    assert isinstance(sp, vllm.SamplingParams)
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed) == (1, 0.7, 0.9, 5, 12, 42)
    assert sp.stop_token_ids == [2, 9] and sp.logprobs == 0 and sp.detokenize is False
    with pytest.raises(TypeError):  # a misspelled keyword would not pass silently (msgspec Struct)
        vllm.SamplingParams(stop_token_idz=[1])


def test_our_stop_ids_are_what_vllm_stops_on(model_dir):
    """Bug 2: vLLM adds generation_config.json's eos ids to every request; our waves pass the same set."""
    from vllm.renderers import renderer_from_config

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ours = stop_token_ids(tokenizer, RolloutConfig(stop_token_ids=(11,)))
    assert ours == (EOS, 11, IM_END, ENDOFTEXT)
    cfg = engine_config(cpu_kwargs(_our_kwargs(model_dir)))
    sp = vllm_sampling(vllm, SamplingParams(stop_token_ids=ours))
    # exactly the call v1/engine/input_processor.py makes for every request
    sp.update_from_generation_config(cfg.model_config.try_get_generation_config(),
                                     renderer_from_config(cfg).get_eos_token_id())
    assert set(sp.stop_token_ids) == set(ours)
    # without our generation-config ids, vLLM would stop on ids the CPU twin does not
    sp = vllm_sampling(vllm, SamplingParams(stop_token_ids=(EOS, 11)))
    sp.update_from_generation_config(cfg.model_config.try_get_generation_config(), None)
    assert set(sp.stop_token_ids) == {EOS, 11, IM_END, ENDOFTEXT}


def test_the_api_our_refit_sleep_and_shutdown_call():
    """The methods the engine calls exist with the arguments it passes (their GPU behaviour is cited in the
    fake-module test)."""
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    assert list(inspect.signature(vllm.LLM.sleep).parameters)[:2] == ["self", "level"]
    assert "tags" in inspect.signature(vllm.LLM.wake_up).parameters
    assert "reset_prefix_cache" in dir(vllm.LLM) and "generate" in dir(vllm.LLM)
    # close(): llm.llm_engine.engine_core.shutdown() on the in-process client
    assert "engine_core" in inspect.getsource(LLMEngine.__init__) and callable(InprocClient.shutdown)
    assert "model_executor" in inspect.getsource(LLMEngine.__init__)
    assert "destroy_model_parallel" in inspect.getsource(ExecutorWithExternalLauncher.shutdown)
    # level 2 keeps the buffers (rotary caches) and restores them on wake_up(["weights"])
    from vllm.v1.worker.gpu_worker import Worker

    assert "_sleep_saved_buffers" in inspect.getsource(Worker.sleep)
    assert "_sleep_saved_buffers" in inspect.getsource(Worker.wake_up)
    # the refit: Worker.reload_weights(weights_iterator=...) -> the in-place reload; a tied head's processing
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert callable(Worker.reload_weights)
    assert "weights_iterator" in inspect.signature(GPUModelRunner.reload_weights).parameters
    assert "layer.weight = embed_tokens.weight" in inspect.getsource(UnquantizedEmbeddingMethod.tie_weights)
    assert callable(UnquantizedEmbeddingMethod.process_weights_after_loading) and callable(ParallelLMHead.tie_weights)
