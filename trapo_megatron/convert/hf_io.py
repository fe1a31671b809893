"""Hugging Face checkpoint files: lazy safetensors reading and streaming sharded safetensors writing.

Reading opens every ``*.safetensors`` file once and returns one tensor at a time, so a converter holds only
the tensors of the entry it is working on. Writing plans the shard files up front from the tensor names,
shapes and dtypes (which the mapping knows before any weight is touched), writes each file's header first
and then appends tensors in order as they arrive: peak memory is one tensor group, not one shard.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# config, generation config and tokenizer files copied verbatim by the converters.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)
_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

_FROM_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


class HFSource:
    """Tensors of a Hugging Face checkpoint directory (or an in-memory state dict), read one at a time."""

    def __init__(self, source: str | os.PathLike | Mapping[str, torch.Tensor]):
        self._memory: Mapping[str, torch.Tensor] | None = None
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        if isinstance(source, Mapping):
            self._memory = source
            self.directory = None
            return
        self.directory = Path(source)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
        for path in files:
            handle = safe_open(str(path), framework="pt")
            self._files[path.name] = handle
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if name in self._where:
                    raise ValueError(f"tensor {name} is stored twice ({self._where[name]} and {path.name})")
                self._where[name] = path.name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, from the file headers only."""
        if self._memory is not None:
            return {k: tuple(v.shape) for k, v in self._memory.items()}
        return {n: tuple(self._files[f].get_slice(n).get_shape()) for n, f in self._where.items()}

    def dtype(self, name: str) -> torch.dtype:
        if self._memory is not None:
            return self._memory[name].dtype
        return _FROM_NAME[self._files[self._where[name]].get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[name]
        if name not in self._where:
            raise KeyError(f"tensor {name} is not in the checkpoint at {self.directory}")
        return self._files[self._where[name]].get_tensor(name)

    def config(self) -> dict:
        if self.directory is None:
            raise ValueError("an in-memory state dict has no config.json: pass the config explicitly")
        return json.loads((self.directory / "config.json").read_text())


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors")
    return _DTYPE_NAMES[dtype]


@dataclass
class _Shard:
    filename: str
    names: list[str] = field(default_factory=list)
    nbytes: int = 0


class SafetensorsWriter:
    """Writes tensors, in a planned order, into sharded safetensors files plus the HF index.

    ``plan`` is [(name, shape, dtype)] in the order :meth:`write` will be called. Tensors go into a shard
    until it would exceed ``max_shard_bytes``; a single file is written as ``model.safetensors``.
    """

    def __init__(self, directory: str | os.PathLike, plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30):
        self.directory = Path(directory)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}
        shards: list[_Shard] = [_Shard("")]
        for name, shape, dtype in plan:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if shards[-1].names and shards[-1].nbytes + nbytes > max_shard_bytes:
                shards.append(_Shard(""))
            shards[-1].names.append(name)
            shards[-1].nbytes += nbytes
            self._meta[name] = (tuple(shape), dtype, nbytes)
        total = len(shards)
        for i, shard in enumerate(shards):
            shard.filename = SINGLE_NAME if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        self._shards = shards
        self._order = [n for s in shards for n in s.names]
        self._next = 0
        self._file: Any = None
        self._shard_index = -1

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard_index += 1
        shard = self._shards[self._shard_index]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in shard.names:
            shape, dtype, nbytes = self._meta[name]
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(self.directory / shard.filename, "wb")  # noqa: SIM115 - spans write() calls; close()
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; names must come in plan order, with the planned shape and dtype."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"safetensors writer got {name}, expected {expected}")
        shape, dtype, _ = self._meta[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        if self._shard_index + 1 < len(self._shards) and name == self._shards[self._shard_index + 1].names[0]:
            self._open_next_shard()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Close the last file and write the index (sharded output only); every planned tensor must be in."""
        if self._next != len(self._order):
            raise ValueError(f"safetensors writer closed after {self._next} of {len(self._order)} tensors; "
                             f"next missing: {self._order[self._next]}")
        if self._file is not None:
            self._file.close()
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(m[2] for m in self._meta.values())},
                "weight_map": {n: s.filename for s in self._shards for n in s.names},
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config, generation config and tokenizer files present in ``src``; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if name not in skip and (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def temporary_output(final: str | os.PathLike) -> Path:
    """A fresh sibling directory of ``final``; :func:`commit_output` moves it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, final: str | os.PathLike, overwrite: bool = False) -> None:
    """Move the finished temporary directory to ``final`` (replacing it only with ``overwrite``)."""
    final = Path(final)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite to replace it")
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_checkpoint(
    out_dir: str | os.PathLike, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]], side_files_from: str | os.PathLike, *, overwrite: bool = False,
    max_shard_bytes: int = 5 * 10**9, tick: Any = None,
) -> Path:
    """A Hugging Face checkpoint at ``out_dir``: ``tensors`` (in ``plan`` order, cast to the planned dtype)
    as sharded safetensors + index, and the config / tokenizer files of ``side_files_from``. Written to a
    temporary sibling and moved into place at the end; nothing is left behind on failure."""
    tmp = temporary_output(out_dir)
    try:
        writer = SafetensorsWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
        dtypes = {name: dtype for name, _, dtype in plan}
        for name, tensor in tensors:
            writer.write(name, tensor.to(dtypes.get(name, tensor.dtype)))
            if tick is not None:
                tick()
        writer.close()
        copy_side_files(side_files_from, tmp)
        commit_output(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)
