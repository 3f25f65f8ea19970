"""Streaming reads and writes of torch.distributed.checkpoint (DCP) directories, one chunk at a time.

megatron-core's torch_dist checkpoints are DCP directories of global tensors, with the layers of
a model stacked on dim 0. DCP's own save and load take a whole state dict in memory; a 70B model
does not fit a conversion host that way. These planners, written against DCP's public planner API,
hand DCP one chunk (one layer of one tensor) at a time: a writer chunk is produced only when DCP
serializes it, and a read fills one chunk-sized buffer. DCP still owns the file format.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


@dataclass
class Chunk:
    """One piece of a global tensor (or one picklable object, when `shape` is None)."""

    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...] | None  # the chunk's own shape; None: a byte object
    global_shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    produce: Callable[[], object]  # called when DCP writes this chunk


class _StreamingSavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[Chunk]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, tuple(c.offsets) if c.shape is not None else None): c for c in chunks}

    def create_local_plan(self) -> SavePlan:
        items = []
        for (key, offsets), chunk in self.chunks.items():
            if chunk.shape is None:
                items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
                continue
            items.append(WriteItem(
                index=MetadataIndex(key, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk.shape)),
                    properties=TensorProperties(dtype=chunk.dtype),
                    size=torch.Size(chunk.global_shape),
                ),
            ))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        index = write_item.index
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save(self.chunks[(index.fqn, None)].produce(), buffer)
            return buffer
        chunk = self.chunks[(index.fqn, tuple(index.offset))]
        tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.shape) or tensor.dtype != chunk.dtype:
            raise ValueError(f"{chunk.key} at {chunk.offsets}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {chunk.shape} {chunk.dtype}")
        return tensor.contiguous()


def write(path: str | Path, chunks: list[Chunk]) -> None:
    """Write a DCP directory from `chunks`, materialising one chunk at a time."""
    from torch.distributed.checkpoint import save

    Path(path).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "no process group, assuming a single process": it is
        warnings.simplefilter("ignore")
        save({}, storage_writer=FileSystemWriter(str(path), thread_count=1, sync_files=False),
             planner=_StreamingSavePlanner(chunks),
             no_dist=True)


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads one region of one global tensor into a buffer of the region's shape."""

    def __init__(self, key: str, offsets: tuple[int, ...], out: torch.Tensor):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.offsets, self.out = key, offsets, out

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        region = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [region]))

    def resolve_tensor(self, read_item):
        view = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of `out`: the data is already in place


class Reader:
    """Random access to a DCP directory's tensors, by region."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = FileSystemReader(str(path))
        self.metadata = self._reader.read_metadata()
        self.entries = self.metadata.state_dict_metadata

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self.entries.items() if isinstance(v, TensorStorageMetadata)]

    def object_keys(self) -> list[str]:
        return [k for k, v in self.entries.items() if isinstance(v, BytesStorageMetadata)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].properties.dtype

    def read(self, key: str, index: int | tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor, or the sub-tensor at leading indices `index` (one layer of a stacked
        megatron tensor; one expert of one layer: (layer, expert))."""
        from torch.distributed.checkpoint import load

        index = () if index is None else (index,) if isinstance(index, int) else tuple(index)
        shape = self.shape(key)
        offsets = index + (0,) * (len(shape) - len(index))
        region = (1,) * len(index) + shape[len(index):]
        out = torch.empty(region, dtype=self.dtype(key))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load({}, storage_reader=FileSystemReader(str(self.path)),
                 planner=_ChunkLoadPlanner(key, offsets, out), no_dist=True)
        return out.reshape(shape[len(index):])

    def storage_files(self) -> set[str]:
        return {info.relative_path for info in self.metadata.storage_data.values()}
