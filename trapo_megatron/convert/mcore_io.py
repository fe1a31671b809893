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
import os
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
        """{key: (offsets, sizes)} -> {key: tensor of ``sizes``} in one pass over the files."""
        dests = {k: (off, torch.empty(size, dtype=self.dtype(k))) for k, (off, size) in requests.items()}
        dcp.load({}, storage_reader=self._reader, planner=_ChunkLoadPlanner(dests), no_dist=True)
        return {k: t for k, (_, t) in dests.items()}
