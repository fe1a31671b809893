"""Shared pieces of the Megatron tests: tiny HF configs, TP/PP-invariant weights, full-tensor gathers.

Weights are a function of the GLOBAL parameter name (global layer index), generated at full size and cut for
this rank exactly as megatron shards them, so any TP x PP layout holds the same model as TP=1.
"""

from __future__ import annotations

import hashlib
import re

import torch
import torch.distributed as dist

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}


def tiny_hf_config(family: str, tied: bool = False, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config}[family]
    kwargs = {**TINY, "tie_word_embeddings": tied, **overrides}
    if family == "qwen3":
        kwargs.setdefault("head_dim", 24)  # explicit, unlike hidden_size / heads = 16
    if family == "qwen2":
        kwargs.setdefault("rope_theta", 10000.0)
    else:
        kwargs.setdefault("rope_theta", 500000.0)
    return cls(**kwargs)


def global_name(name: str, module: torch.nn.Module) -> str:
    """Parameter name with the stage-local layer index replaced by the global one."""
    m = re.match(r"(.*decoder\.layers\.)(\d+)(\..*)", name)
    if not m:
        return name
    layer = module.decoder.layers[int(m.group(2))]
    return f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"


def _seed(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def full_shape(param: torch.nn.Parameter, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def shard(full: torch.Tensor, param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """This rank's slice of ``full`` as megatron lays it out (SwiGLU fc1 is [gate shard; up shard])."""
    rank, size = _tp()
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_gated_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def unshard(local: torch.Tensor, param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """Inverse of :func:`shard`: all-gather over TP and reassemble the full tensor."""
    from megatron.core import parallel_state as ps

    _, size = _tp()
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    if _is_gated_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], 0)
    return torch.cat(parts, dim=param.partition_dim)


def fill_deterministic(chunks: list, tied: bool) -> None:
    _, size = _tp()
    with torch.no_grad():
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            for name, p in module.named_parameters():
                gname = global_name(name, module)
                key = "embedding.word_embeddings.weight" if tied and gname == "output_layer.weight" else gname
                g = torch.Generator().manual_seed(_seed(key))
                if "layernorm" in gname or "final_layernorm" in gname:
                    full = 1.0 + 0.1 * torch.randn(full_shape(p, size), generator=g)
                else:
                    full = 0.05 * torch.randn(full_shape(p, size), generator=g)
                p.copy_(shard(full, p, name))


def full_grads(chunks: list) -> dict[str, torch.Tensor]:
    """Global name -> full gradient (from DDP's main_grad), for this rank's stage."""
    out = {}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for name, p in module.named_parameters():
            grad = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
            out[global_name(name, module)] = unshard(grad.float(), p, name)
    return out
