"""Colocated vLLM 0.33 rollout engine (GPU), SPMD under torchrun. Implements ``RolloutEngine``.

Every choice below is a fact read from the vLLM 0.33.0 source (see the project's VLLM notes):
- ``distributed_executor_backend="external_launcher"`` when the world has more than one rank: one in-process
  worker per rank, reusing the trainer's torch.distributed world; build the engine on ALL ranks together.
- ``load_format="dummy"``: random weights at start, the trainer pushes the real ones.
- ``skip_tokenizer_init=True``: prompts are token ids, so EOS is not a stop unless passed in stop_token_ids.
- ``enable_sleep_mode``: ``sleep(level=1)`` while training; refit = wake_up(["weights"]) -> model.load_weights
  -> wake_up(["kv_cache"]) -> reset_prefix_cache (a weight update does not reset the prefix cache).
- ``dtype="bfloat16"`` ("auto" would turn an fp32 checkpoint into fp16); weights are cast before streaming.
- ``logprobs_mode="processed_logprobs"``: log-probs of the distribution actually sampled from, like the CPU
  twin (equal to raw log-probs at T=1, top_p=1, top_k=0).
- vLLM's seeding reseeds python/numpy/torch in THIS process: the trainer's RNG states are restored after.
- Cascade attention was removed in 0.33 (``disable_cascade_attn`` is a deprecated no-op): nothing to turn off.
- Every request carries an explicit seed (unseeded ones draw from numpy and would differ across TP ranks).

``import vllm`` happens only inside methods: this module imports on CPU; using it there raises RuntimeError.
"""

from __future__ import annotations

import gc
import os
import random
from typing import Any, Iterator, Sequence

import torch

from trapo_megatron.rollout.engine import Generation, SamplingParams, WeightStream, check_generate_args

NOT_INSTALLED = "vLLM is not installed (pip install 'trapo-megatron[gpu]')"
_TIED_HEAD = "lm_head.weight"


def import_vllm():
    """The vllm module, or a RuntimeError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError(NOT_INSTALLED) from err
    if vllm is None:  # sys.modules["vllm"] = None blocks the import the same way
        raise RuntimeError(NOT_INSTALLED)
    return vllm


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    """vLLM ``LLM`` in this process, asleep while the trainer trains.

    model_dir: a Hugging Face model folder (config.json is what matters; weights come through load_weights).
    engine_kwargs: extra ``vllm.LLM`` arguments (max_num_seqs, kv_cache_memory_bytes, ...), applied last.
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
        kwargs: dict[str, Any] = dict(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            dtype="bfloat16",
            seed=seed,
            load_format="dummy",
            skip_tokenizer_init=True,
            enable_sleep_mode=True,
            enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if _world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs or {})
        saved = _rng_state()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            _set_rng_state(saved)
        hf_config = getattr(getattr(self.llm.llm_engine, "model_config", None), "hf_config", None)
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self._sleeping = False
        self.num_generate_calls = 0

    # ------------------------------------------------------------------------------------ weights
    def _model(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.get_model()

    def _bf16_stream(self, weights: WeightStream) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if self.tied and name == _TIED_HEAD:
                continue  # tied: the head is the embedding (sending it alone is a ValueError in vLLM)
            yield name, tensor.to(torch.bfloat16)

    def load_weights(self, weights: WeightStream) -> None:
        """Refit: wake the weights, copy full HF-named tensors through the model's load_weights, wake the KV
        cache, drop the prefix cache (it holds KV of the old weights)."""
        was_sleeping = self._sleeping
        if was_sleeping:
            self.llm.wake_up(tags=["weights"])
        self._model().load_weights(weights=self._bf16_stream(weights))
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
        sampling = [
            vllm.SamplingParams(
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
            for p in params
        ]
        self.num_generate_calls += 1
        outs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [_to_generation(i, out) for i, out in enumerate(outs)]

    # ------------------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        """Weights to pinned CPU memory, KV cache dropped (level 1); idempotent."""
        if not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        """Back with the weights held before sleep; idempotent."""
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._sleeping = True


def _to_generation(index: int, out) -> Generation:
    """A vLLM RequestOutput -> Generation (the sampled token's log-prob from logprobs=0)."""
    c = out.outputs[0]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {index} finished with {c.finish_reason!r}")
    token_ids = list(c.token_ids)
    logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(token_ids)]
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)
