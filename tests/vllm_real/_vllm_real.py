"""vLLM 0.33.0 pieces that run on CPU (VLLM_TARGET_DEVICE=cpu; the CUDA wheel has no CPU kernels, so no LLM).

- :func:`engine_config`: the EngineArgs -> VllmConfig step of ``LLM(...)`` (vllm/entrypoints/llm.py builds
  EngineArgs from its keywords, vllm/v1/engine/llm_engine.py calls create_engine_config) for our keywords.
- :func:`build_model`: vLLM's own model class for an HF dir, on CPU in fp32, in vLLM's parallel state.
- :func:`sdpa_attention`: vLLM's paged ``Attention.forward`` (vllm/model_executor/layers/attention/attention.py)
  replaced by causal torch SDPA on one sequence, so a forward pass checks the weight mapping numerically
  (not vLLM's kernels, KV cache or sampler).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

os.environ["VLLM_TARGET_DEVICE"] = "cpu"  # CpuPlatform: without it the platform is Unspecified (no device)


def engine_config(kwargs: dict[str, Any]):
    """The VllmConfig ``LLM(**kwargs)`` would build (plus the CPU-only settings the forward pass needs)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**kwargs).create_engine_config()


def cpu_kwargs(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our engine's LLM keywords adjusted to what CpuPlatform accepts: fp32 (the logits are compared to
    1e-4), no sleep mode (CUDA only), no custom ops (vllm._C is not in the CUDA wheel's CPU path)."""
    kw = {k: v for k, v in engine_kwargs.items() if k not in ("enable_sleep_mode", "gpu_memory_utilization")}
    return {**kw, "dtype": "float32", "compilation_config": {"custom_ops": ["none"]}}


def init_parallel(cfg, tp: int) -> None:
    """vLLM's world and TP groups over the torch.distributed world that is already running (reused, as
    vllm/distributed/parallel_state.py init_distributed_environment does when it is initialized)."""
    import torch.distributed as dist
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as vps

    if vps.model_parallel_is_initialized():
        return
    with set_current_vllm_config(cfg):
        vps.init_distributed_environment(world_size=dist.get_world_size(), rank=dist.get_rank(),
                                         local_rank=dist.get_rank(), backend="gloo")
        vps.initialize_model_parallel(tp, 1)


def build_model(cfg):
    """vLLM's model class for cfg's architecture, constructed on CPU in fp32."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import get_model_architecture

    cls, _ = get_model_architecture(cfg.model_config)
    torch.set_default_dtype(torch.float32)
    with set_current_vllm_config(cfg):
        return cls(vllm_config=cfg, prefix="")


def finish_loading(model, cfg) -> None:
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))


@contextlib.contextmanager
def sdpa_attention() -> Iterator[None]:
    """Attention.forward -> causal SDPA over the (tokens, heads * head_dim) rows of ONE sequence (GQA by
    repeating KV heads); restored afterwards."""
    from vllm.model_executor.layers.attention.attention import Attention

    def forward(self, query, key, value, output_shape=None, output_dtype=None):
        t = query.shape[0]
        q = query.view(t, self.num_heads, self.head_size).transpose(0, 1)
        k = key.view(t, self.num_kv_heads, self.head_size).transpose(0, 1)
        v = value.view(t, self.num_kv_heads, self.head_size).transpose(0, 1)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.impl.scale)
        return out.transpose(0, 1).reshape(t, self.num_heads * self.head_size)

    saved = Attention.forward
    Attention.forward = forward
    try:
        yield
    finally:
        Attention.forward = saved


def logits(model, cfg, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(b, s, vocab) logits of vLLM's model, one sequence per forward pass; every rank gets them."""
    import torch.distributed as dist
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    rows = []
    with torch.no_grad(), sdpa_attention(), set_current_vllm_config(cfg), set_forward_context(None, cfg):
        for seq in ids:
            hidden = model(input_ids=seq, positions=torch.arange(seq.numel()))
            out = model.compute_logits(hidden)  # full vocab on the TP group's first rank (vLLM gathers there)
            rows.append(out[:, :vocab] if out is not None else torch.zeros(seq.numel(), vocab))
    full = torch.stack(rows)
    dist.broadcast(full, src=0)
    return full
