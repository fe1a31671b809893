"""Megatron distributed checkpoints (torch_dist format), written and read one tensor chunk at a time.

The format is what ``megatron.core.dist_checkpointing.save(model.sharded_state_dict(), dir)`` produces, so
``dist_checkpointing.load`` loads it into a model at any TP/PP:
- one torch DCP tensor per checkpoint key; per-layer weights are stacked on a leading global-layer axis
  (key ``decoder.layers.self_attention.linear_qkv.weight``, shape (L, *TP=1 shape)); norms use the TE names
  on both layer specs (the local spec maps its keys to them); tensors hold the TP=1 layout of ``formats``;
- per-layer ``_extra_state`` objects of the four linear layers (``[None]`` when FP8 is off) and
  ``common_state`` (``[{}]``) as bytes items; ``metadata.json`` names the backend.

Instead of materialising a model, a custom DCP save planner declares every chunk (one layer of one key)
from shapes alone and computes each chunk only when the writer asks for it (``resolve_data``); reading
asks DCP for the chunks of one layer at a time. Peak memory is one tensor group either way.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import _create_write_items, create_read_items_for_chunk_list

LAYERS = "decoder.layers.*."
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}

# (checkpoint key, chunk offsets) -> tensor of the chunk's shape
ChunkFn = Callable[[str, tuple[int, ...]], torch.Tensor]


def checkpoint_key(mcore_name: str) -> str:
    """Wildcard Megatron name (TE spec) -> distributed-checkpoint key (layers stacked, no index)."""
    return mcore_name.replace(LAYERS, "decoder.layers.")


def _pickled(obj: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save([obj], buf)  # megatron stores a ShardedObject as the list of its local data
    buf.seek(0)
    return buf


def extra_objects(num_layers: int) -> dict[str, io.BytesIO]:
    """The non-tensor items megatron writes for a GPT model: per-layer linear ``_extra_state`` + common state."""
    objects = {
        f"decoder.layers.{m}._extra_state/shard_{layer}_{num_layers}": _pickled(None)
        for layer in range(num_layers) for m in EXTRA_STATE_MODULES
    }
    objects["common_state/shard_0_1"] = _pickled({})
    return objects


class _LazySavePlanner(DefaultSavePlanner):
    """Declares chunks from shapes; produces each chunk's data only when the storage writer asks."""

    def __init__(self, chunks: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], torch.dtype]],
                 produce: ChunkFn, on_chunk: Callable[[], None] = lambda: None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = chunks  # (key, global shape, offsets, sizes, dtype)
        self._produce = produce
        self._on_chunk = on_chunk

    def create_local_plan(self) -> SavePlan:
        items = [item for fqn, obj in self.state_dict.items() for item in _create_write_items(fqn, obj)]
        for key, global_shape, offsets, sizes, dtype in self._chunks:
            items.append(WriteItem(
                index=MetadataIndex(key, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dtype),
                    size=torch.Size(global_shape),
                ),
            ))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):  # type: ignore[override]
        if write_item.type == WriteItemType.BYTE_IO:
            return self.state_dict[write_item.index.fqn]
        key, offsets = write_item.index.fqn, tuple(write_item.index.offset)
        tensor = self._produce(key, offsets)
        want = tuple(write_item.tensor_data.chunk.sizes)
        if tuple(tensor.shape) != want:
            raise AssertionError(f"{key} chunk at {offsets}: produced {tuple(tensor.shape)}, declared {want}")
        self._on_chunk()
        return tensor


def save_lazy(directory: str | os.PathLike, chunks: list, produce: ChunkFn, objects: dict[str, io.BytesIO],
              on_chunk: Callable[[], None] = lambda: None) -> None:
    """Write a torch_dist checkpoint whose tensor chunks come from ``produce`` one at a time."""
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, sync_files=False)
    dcp.save(objects, storage_writer=writer, planner=_LazySavePlanner(chunks, produce, on_chunk), no_dist=True)
    (Path(directory) / "metadata.json").write_text(json.dumps(BACKEND))


class _ChunkLoadPlanner(LoadPlanner):
    """Reads requested chunks (key, offsets) into given destination tensors."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        self._requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:  # type: ignore[override]
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, (offsets, dest) in self._requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError(f"unexpected bytes item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self._requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: the data is already in place


class McoreCheckpoint:
    """Tensor metadata of a torch_dist checkpoint and chunk reads from it."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        config = self.directory / "metadata.json"
        if not config.is_file() or json.loads(config.read_text()).get("sharded_backend") != "torch_dist":
            raise ValueError(f"{self.directory} is not a megatron torch_dist checkpoint (metadata.json)")
        self._reader = dcp.FileSystemReader(str(self.directory))
        self.metadata = self._reader.read_metadata()

    def shape(self, key: str) -> tuple[int, ...] | None:
        md = self.metadata.state_dict_metadata.get(key)
        return tuple(md.size) if md is not None and hasattr(md, "size") else None

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, requests: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """{key: (offsets, sizes)} -> {key: tensor of ``sizes``}.

        A request that is exactly one stored chunk (always so for ``hf-to-mcore`` output and for
        unsharded tensors) is a zero-copy view of the memory-mapped file; any other (a TP-sharded
        training checkpoint) goes through DCP, which reassembles it from the overlapping chunks.
        """
        out, rest = {}, {}
        for key, (offsets, sizes) in requests.items():
            view = self._stored_chunk(key, offsets, sizes)
            if view is None:
                rest[key] = (offsets, torch.empty(sizes, dtype=self.dtype(key)))
            else:
                out[key] = view
        if rest:
            dcp.load({}, storage_reader=self._reader, planner=_ChunkLoadPlanner(rest), no_dist=True)
            out.update({k: t for k, (_, t) in rest.items()})
        return out

    def _stored_chunk(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor | None:
        """The stored chunk at ``offsets`` if it has exactly ``sizes``, as a view of the mapped file."""
        md = self.metadata.state_dict_metadata[key]
        if not any(tuple(c.offsets) == tuple(offsets) and tuple(c.sizes) == tuple(sizes) for c in md.chunks):
            return None
        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
        if info.transform_descriptors:
            return None
        buf = self._mapped(info.relative_path)
        start = _stored_tensor_offset(buf, info.offset, info.length)
        dtype = md.properties.dtype
        numel = torch.Size(sizes).numel()
        if start is None or start[1] != numel * dtype.itemsize:
            return None
        return torch.frombuffer(buf, dtype=dtype, count=numel, offset=info.offset + start[0]).view(sizes)

    def _mapped(self, relative_path: str) -> mmap.mmap:
        if not hasattr(self, "_maps"):
            self._maps: dict[str, mmap.mmap] = {}
        if relative_path not in self._maps:
            with open(self.directory / relative_path, "rb") as f:  # private mapping: writable views, no copies
                self._maps[relative_path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[relative_path]


class _Slice(io.RawIOBase):
    """A read-only file over ``buf[start:start+length]`` (for zipfile) without copying it."""

    def __init__(self, buf: mmap.mmap, start: int, length: int):
        self._view, self._pos = memoryview(buf)[start:start + length], 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = (pos, self._pos + pos, len(self._view) + pos)[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, target) -> int:  # type: ignore[override]
        n = max(0, min(len(target), len(self._view) - self._pos))
        target[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


def _stored_tensor_offset(buf: mmap.mmap, start: int, length: int) -> tuple[int, int] | None:
    """(offset, size) of the single uncompressed storage record in a torch.save blob, relative to ``start``."""
    with zipfile.ZipFile(io.BufferedReader(_Slice(buf, start, length))) as zf:
        records = [i for i in zf.infolist() if i.filename.rsplit("/", 2)[-2:-1] == ["data"]]
        if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
            return None
        info = records[0]
    header = buf[start + info.header_offset:start + info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", header[26:30])  # zip local file header
    return info.header_offset + 30 + name_len + extra_len, info.file_size
