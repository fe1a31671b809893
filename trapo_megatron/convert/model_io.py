"""A built (TP/PP-sharded) Megatron model seen through the mapping: which parameter is which entry, and
loading Hugging Face weights straight into it (what the trainer does at start).

Parameters are matched by name, with the layer index made global through ``TransformerLayer.layer_number``
(1-based, global), so pipeline placement, uneven stages and virtual chunks need no rule of ours. The layer
spec (local or Transformer Engine) is recognised from the parameter names. Process groups come in as
arguments; nothing reads Megatron's global parallel state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from trapo_megatron import model_spec
from trapo_megatron.convert import formats, hf_io, mapping
from trapo_megatron.convert.distribution import Shard, local_shape, shard_for_rank
from trapo_megatron.model_spec import ModelSpec


@dataclass(frozen=True)
class LocalParam:
    """One parameter of this rank: its wildcard entry, global layer (None outside layers) and tensor."""

    name: str
    entry: mapping.Entry
    layer: int | None
    param: torch.Tensor
    tied_copy: bool = False  # output_layer on the last PP stage when embeddings are tied

    @property
    def concrete(self) -> mapping.Entry:
        return self.entry if self.layer is None else self.entry.at_layer(self.layer)


def unwrap(chunk: Any) -> Any:
    """DDP / Float16Module wrappers -> the GPTModel."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def detect_spec(names: Iterable[str]) -> mapping.Spec:
    return mapping.Spec.TE if any(n.endswith("layer_norm_weight") for n in names) else mapping.Spec.LOCAL


def local_params(model_chunks: list[Any], dims: ModelSpec) -> list[LocalParam]:
    """This rank's parameters, each with its mapping entry; ValueError for a parameter the mapping lacks."""
    found: list[LocalParam] = []
    for chunk in model_chunks:
        model = unwrap(chunk)
        named = list(model.named_parameters())
        by_name = {e.mcore: e for e in mapping.entries(dims, detect_spec(n for n, _ in named))}
        for name, param in named:
            parts = name.split(".")
            layer = None
            wildcard = name
            if name.startswith("decoder.layers."):
                layer = model.decoder.layers[int(parts[2])].layer_number - 1
                wildcard = ".".join(parts[:2] + [mapping.LAYER] + parts[3:])
            if wildcard == "output_layer.weight" and dims.tied_embeddings:
                tied = replace(mapping.OUTPUT, hf=("model.embed_tokens.weight",))
                found.append(LocalParam(name, tied, None, param, tied_copy=True))
                continue
            if wildcard not in by_name:
                raise ValueError(f"Megatron parameter {name} has no Hugging Face mapping ({dims.model_type})")
            found.append(LocalParam(name, by_name[wildcard], layer, param))
    return found


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@torch.no_grad()
def load_hf_into_model(
    model_chunks: list[Any],
    hf: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    hf_config: Mapping[str, Any] | Any | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> list[str]:
    """Copy Hugging Face weights into this rank's shards of an already-built Megatron model.

    ``hf`` is a checkpoint directory (its config.json is used unless ``hf_config`` is given) or an in-memory
    HF state dict (then ``hf_config`` is required). ``tp_group`` is the model's tensor-parallel group (None:
    TP=1). Each rank reads only the tensors its parameters need, one entry group at a time. Every tensor
    of the checkpoint is checked against the config, and every shard shape against the model, before any
    parameter is written. Returns the names of the parameters loaded.
    """
    source = hf_io.HFSource(hf)
    if hf_config is None:
        hf_config = source.config()
    dims = model_spec.from_hf_config(hf_config)
    mapping.check_hf_tensors(dims, source.shapes())
    tp_rank, tp_size = _group_info(tp_group)
    params = local_params(model_chunks, dims)
    hf_shapes = mapping.hf_shapes(dims)
    for p in params:  # every shape first: nothing is written into a model that does not fit
        full = hf_shapes[p.concrete.hf[0]] if p.tied_copy else mapping.mcore_shape(p.entry, dims)
        padded = p.param.shape[0] * tp_size if p.entry.shard is Shard.VOCAB else None
        want = local_shape(full, p.entry.shard, tp_size, padded)
        if tuple(p.param.shape) != want:
            raise ValueError(f"{p.name}: model shard {tuple(p.param.shape)} but the HF checkpoint gives {want} "
                             f"at TP={tp_size} (layer {p.layer})")
    for p in params:
        entry = p.concrete
        full = formats.merge(entry.fmt, [source.get(h) for h in entry.hf], dims.heads)
        padded = p.param.shape[0] * tp_size if entry.shard is Shard.VOCAB else None
        p.param.copy_(shard_for_rank(full, entry.shard, tp_rank, tp_size, padded_rows=padded, what=p.name))
    return [p.name for p in params]
