"""Hugging Face checkpoint -> Megatron distributed checkpoint that loads at any TP/PP (offline, streaming).

Nothing is built: every chunk (one layer of one Megatron tensor, TP=1 layout) is read from the safetensors
files, merged (``formats``) and written when the DCP writer asks for it, so peak memory is one tensor group
(e.g. one layer's q, k, v plus the fused linear_qkv). The HF config, generation config and tokenizer files
are kept in ``hf/`` inside the checkpoint so ``mcore-to-hf`` can restore them. Everything is checked against
the config before the first byte is written; output goes to a temporary directory moved into place at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from trapo_megatron import model_spec
from trapo_megatron.convert import formats, hf_io, mapping, mcore_io

HF_SUBDIR = "hf"


def _plan(dims: model_spec.ModelSpec, source: hf_io.HFSource) -> tuple[list, dict[str, mapping.Entry]]:
    """Chunks (key, global shape, offsets, sizes, dtype) and key -> wildcard entry."""
    chunks, by_key = [], {}
    for entry in mapping.entries(dims, mapping.Spec.TE):
        key = mcore_io.checkpoint_key(entry.mcore)
        by_key[key] = entry
        dtypes = {source.dtype(h.replace(mapping.LAYER, "0")) for h in entry.hf}
        if len(dtypes) != 1:
            raise ValueError(f"{entry.hf} have different dtypes {dtypes}; they are fused into {key}")
        dtype = dtypes.pop()
        shape = mapping.mcore_shape(entry, dims)
        if entry.per_layer:
            for layer in range(dims.num_layers):
                chunks.append((key, (dims.num_layers, *shape), (layer, *[0] * len(shape)), (1, *shape), dtype))
        else:
            chunks.append((key, shape, (0,) * len(shape), shape, dtype))
    return chunks, by_key


def convert_hf_to_mcore(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
    progress: Callable[[int], Callable[[], None]] | None = None,
) -> Path:
    """Write ``out_dir`` as a torch_dist checkpoint of the HF model in ``hf_dir``; returns ``out_dir``.

    ``progress(total_chunks)`` may return a per-chunk callback (the CLI passes a progress bar).
    """
    source = hf_io.HFSource(hf_dir)
    dims = model_spec.from_hf_config(source.config())
    mapping.check_hf_tensors(dims, source.shapes())
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    chunks, by_key = _plan(dims, source)

    def produce(key: str, offsets: tuple[int, ...]) -> torch.Tensor:
        entry = by_key[key]
        if entry.per_layer:
            entry = entry.at_layer(offsets[0])
        merged = formats.merge(entry.fmt, [source.get(h) for h in entry.hf], dims.heads)
        return merged.unsqueeze(0) if by_key[key].per_layer else merged

    tmp = hf_io.temporary_output(out_dir)
    try:
        tick = progress(len(chunks)) if progress else (lambda: None)
        mcore_io.save_lazy(tmp, chunks, produce, mcore_io.extra_objects(dims.num_layers), on_chunk=tick)
        (tmp / HF_SUBDIR).mkdir()
        hf_io.copy_side_files(hf_dir, tmp / HF_SUBDIR)
        hf_io.commit_output(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
