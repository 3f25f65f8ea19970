"""safetensors files read and written as streams.

The safetensors library writes a file from a complete dict of tensors and reads through a
memory map, whose touched pages stay resident: converting a 70B model through it costs the
model's size in memory. The format is simple (an 8-byte header length, a JSON header of names,
dtypes, shapes and byte offsets, then raw little-endian data), so kiln writes the header first
from planned shapes and then streams each tensor's bytes, and reads a tensor with one plain
positioned read. Files stay readable by the safetensors library, transformers and TensorRT-LLM.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import SafetensorsError

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}
FROM_NAME = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.tensor([], dtype=self.dtype).element_size()


class StreamWriter:
    """One file: the header is written up front from `entries`; `write` must follow their order."""

    def __init__(self, path: str | Path, entries: list[Entry], metadata: dict | None = None):
        self.path = Path(path)
        self.entries = entries
        header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
        for e in entries:
            header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.entries[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise SafetensorsError(f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned "
                                   f"{expected.name} {expected.shape} {expected.dtype}")
        self._file.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data)  # no copy
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.entries):
            raise SafetensorsError(f"{self.path}: {len(self.entries) - self._next} planned tensors were not written")


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, data start), checking that the file holds every byte its header promises."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path} is truncated ({size} bytes): download it again")
        length = struct.unpack("<Q", head)[0]
        if 8 + length > size:
            raise SafetensorsError(f"{path} is truncated: its header needs {8 + length} bytes; download it again")
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise SafetensorsError(f"{path} is truncated: {size} bytes, its tensors need {8 + length + end}; "
                               f"download it again")
    return header, 8 + length


class StreamReader:
    """Tensors of one file by name, each read with a single positioned read (no memory map)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self._start = read_header(self.path)
        self.header.pop("__metadata__", None)
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return FROM_NAME[self.header[name]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        data = bytearray(end - begin)
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.preadv(self._fd, [view[done:]], self._start + begin + done)
        dtype = FROM_NAME[info["dtype"]]
        if not data:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])
