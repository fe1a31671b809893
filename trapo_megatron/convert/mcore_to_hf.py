"""Megatron distributed checkpoint -> Hugging Face checkpoint (sharded safetensors + index, config,
generation config, tokenizer), streaming one layer's tensor group at a time.

The checkpoint may come from ``hf-to-mcore`` or from training at any TP/PP (DCP reassembles the TP=1 layout
of each requested chunk). The config comes from ``hf_config_dir`` or the ``hf/`` folder ``hf-to-mcore`` left
in the checkpoint. Keys and shapes are checked against the config before anything is written; padded
vocabulary rows are dropped; output is written to a temporary directory and moved into place at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from trapo_megatron import model_spec
from trapo_megatron.convert import formats, hf_io, mapping, mcore_io
from trapo_megatron.convert.distribution import Shard
from trapo_megatron.convert.hf_to_mcore import HF_SUBDIR


def _check(dims: model_spec.ModelSpec, ckpt: mcore_io.McoreCheckpoint) -> None:
    problems = []
    for entry in mapping.entries(dims, mapping.Spec.TE):
        key = mcore_io.checkpoint_key(entry.mcore)
        shape = mapping.mcore_shape(entry, dims)
        want = (dims.num_layers, *shape) if entry.per_layer else shape
        found = ckpt.shape(key)
        if found is None:
            problems.append(f"{key}: missing")
        elif entry.shard is Shard.VOCAB:
            if found[1:] != want[1:] or found[0] < want[0]:
                problems.append(f"{key}: checkpoint {found} vs config {want} (vocab may only be padded)")
        elif found != want:
            problems.append(f"{key}: checkpoint {found} vs config {want}")
    if problems:
        raise ValueError(
            f"the Megatron checkpoint does not match the config ({dims.model_type}, {dims.num_layers} layers, "
            f"hidden {dims.hidden_size}, heads {dims.num_attention_heads}/{dims.num_query_groups}, vocab "
            f"{dims.vocab_size}, tied={dims.tied_embeddings}): " + "; ".join(problems[:8])
        )


def iter_checkpoint_hf(ckpt: mcore_io.McoreCheckpoint, dims: model_spec.ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for every HF tensor, reading one entry group (one layer of one key) at a time."""
    for entry, layer in mapping.walk(dims, mapping.Spec.TE):
        key = mcore_io.checkpoint_key(entry.mcore)
        shape = ckpt.shape(key)
        if layer is not None:
            tensor = ckpt.read({key: ((layer, *[0] * (len(shape) - 1)), (1, *shape[1:]))})[key][0]
            entry = entry.at_layer(layer)
        else:
            if entry.shard is Shard.VOCAB:
                shape = (dims.vocab_size, *shape[1:])  # drop padded rows
            tensor = ckpt.read({key: ((0,) * len(shape), shape)})[key]
        yield from zip(entry.hf, formats.split(entry.fmt, tensor, dims.heads))


def convert_mcore_to_hf(
    mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, *, hf_config_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 10**9, dtype: torch.dtype | None = None, overwrite: bool = False,
    progress: Callable[[int], Callable[[], None]] | None = None,
) -> Path:
    """Write ``out_dir`` as a Hugging Face checkpoint of the Megatron checkpoint ``mcore_dir``.

    ``dtype`` casts every tensor (None keeps the checkpoint's dtypes, bit for bit). ``progress(total)`` may
    return a per-tensor callback (the CLI passes a progress bar).
    """
    ckpt = mcore_io.McoreCheckpoint(mcore_dir)
    config_dir = Path(hf_config_dir) if hf_config_dir else Path(mcore_dir) / HF_SUBDIR
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {config_dir}: pass the HF config directory explicitly")
    dims = model_spec.from_hf_config(json.loads((config_dir / "config.json").read_text()))
    _check(dims, ckpt)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    plan = []
    hf_shapes = mapping.hf_shapes(dims)
    for entry, layer in mapping.walk(dims, mapping.Spec.TE):
        stored = ckpt.dtype(mcore_io.checkpoint_key(entry.mcore))
        concrete = entry if layer is None else entry.at_layer(layer)
        plan += [(h, hf_shapes[h], dtype or stored) for h in concrete.hf]
    tick = progress(len(plan)) if progress else None
    hf_io.write_checkpoint(out_dir, plan, iter_checkpoint_hf(ckpt, dims), config_dir, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes, tick=tick)
    return out_dir

