"""Megatron indexed datasets (`<prefix>.bin` + `<prefix>.idx`), written in large chunks.

megatron-core's `IndexedDatasetBuilder` takes one document per call and keeps every length in
Python lists until `finalize`; `IndexedWriter` writes the same bytes from concatenated numpy
chunks, one sequence per document, and keeps nothing per document in memory: lengths go
straight into the .idx (their place there is fixed), pointers and document indices are
streamed from them at the end. tests/data/test_prepare.py compares the bytes with the builder.

The .idx layout (megatron/core/datasets/indexed_dataset.py, `_IndexWriter`):

    b"MMIDIDX\\x00\\x00"  <Q 1  <B dtype code  <Q sequences  <Q documents (+1)
    int32 sequence lengths, int64 sequence byte offsets, int64 document indices [0, 1, .., n]

Imports numpy only (megatron-core costs ~8 s of imports; `merge` is the one function that loads it).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
          np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_LENGTHS_AT = len(HEADER) + 8 + 1 + 8 + 8  # where the int32 lengths start
_STREAM = 1 << 22  # entries per step when streaming pointers and document indices


def optimal_dtype(vocab_size: int) -> type:
    """megatron-core's `DType.optimal_dtype`: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65_500 else np.int32


class IndexedWriter:
    """Write `<prefix>.bin/.idx`; `add` takes many documents at once (tokens concatenated, one
    length per document). Use as a context manager, or call `finalize` (and `abort` on failure)."""

    def __init__(self, prefix: str | os.PathLike, dtype: type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self._bin = open(f"{self.prefix}.bin", "wb")
        self._idx = open(f"{self.prefix}.idx", "w+b")
        self._idx.seek(_LENGTHS_AT)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {len(tokens)} tokens were given")
        if len(lengths) and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("a document length is negative or does not fit the index's int32")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self._idx.write(lengths.astype(np.int32).data)
        self.documents += len(lengths)
        self.tokens += len(tokens)

    def finalize(self) -> dict:
        """Write pointers, document indices and the header; returns {documents, tokens}."""
        self._bin.close()
        n, idx = self.documents, self._idx
        offset = 0
        for start in range(0, n, _STREAM):  # int64 byte offsets of each sequence, from the lengths
            idx.seek(_LENGTHS_AT + 4 * start)
            lengths = np.frombuffer(idx.read(4 * min(_STREAM, n - start)), dtype=np.int32).astype(np.int64)
            ends = np.cumsum(lengths) * self.dtype.itemsize + offset
            pointers = np.empty_like(ends)
            pointers[0] = offset
            pointers[1:] = ends[:-1]
            offset = int(ends[-1])
            idx.seek(_LENGTHS_AT + 4 * n + 8 * start)
            idx.write(pointers.data)
        idx.seek(_LENGTHS_AT + 12 * n)
        for start in range(0, n + 1, _STREAM):  # one sequence per document: indices 0..n
            idx.write(np.arange(start, min(start + _STREAM, n + 1), dtype=np.int64).data)
        idx.seek(0)
        idx.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", _CODES[self.dtype])
                  + struct.pack("<Q", n) + struct.pack("<Q", n + 1))
        idx.close()
        return {"documents": n, "tokens": self.tokens}

    def abort(self) -> None:
        self._bin.close()
        self._idx.close()
        for suffix in (".bin", ".idx"):
            Path(f"{self.prefix}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def merge(prefixes: list[str | os.PathLike], out_prefix: str | os.PathLike) -> dict:
    """Concatenate indexed datasets in order with megatron-core's `IndexedDatasetBuilder.add_index`
    (what a driver does with per-split outputs); returns {documents, tokens}."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    if not prefixes:
        raise ValueError("nothing to merge: give at least one prefix")
    dtype = _IndexReader(f"{prefixes[0]}.idx", multimodal=False).dtype
    builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=dtype)
    for prefix in prefixes:
        builder.add_index(str(prefix))
    builder.finalize(f"{out_prefix}.idx")
    counts = read_counts(out_prefix)
    return {"documents": counts["documents"], "tokens": counts["tokens"]}


def read_counts(prefix: str | os.PathLike) -> dict:
    """{documents, tokens, dtype} of a dataset, from its .idx header and the .bin size."""
    with open(f"{prefix}.idx", "rb") as f:
        head = f.read(_LENGTHS_AT)
    if head[: len(HEADER)] != HEADER:
        raise ValueError(f"{prefix}.idx is not a Megatron indexed dataset index")
    code = head[len(HEADER) + 8]
    dtype = next(d for d, c in _CODES.items() if c == code)
    documents = struct.unpack("<Q", head[-8:])[0] - 1
    return {"documents": documents, "tokens": os.path.getsize(f"{prefix}.bin") // dtype.itemsize,
            "dtype": dtype.name}
