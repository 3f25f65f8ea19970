"""Contiguous input splits: the unit of work of the data stages' Ray engine.

An uncompressed JSONL file is cut into byte ranges of about `split_bytes`, each starting on a
line boundary and knowing its first line number, so a document located as `file:line` (and
every id derived from it) is the same whichever split read it. Compressed files, Parquet and
WARC cannot be entered in the middle: each is one split. Splits keep the inputs' order, so
(split index, row within the split) orders documents exactly as one sequential reader would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_BLOCK = 16 << 20


@dataclass(frozen=True)
class Split:
    path: str
    start: int = 0  # byte offset of the first line
    end: int | None = None  # byte offset past the last line; None: the end of the file
    first_line: int = 1

    def __str__(self) -> str:
        return self.path if self.end is None and self.start == 0 else f"{self.path} (bytes {self.start}-{self.end})"


def plan(files: list[Path], split_bytes: int) -> list[Split]:
    splits: list[Split] = []
    for path in files:
        if path.name.endswith(".jsonl") and path.stat().st_size > split_bytes:
            splits += _line_ranges(path, split_bytes)
        else:
            splits.append(Split(str(path)))
    return splits


def _line_ranges(path: Path, split_bytes: int) -> list[Split]:
    """Cut at the first line start at or after `split_bytes` past the previous cut. One pass
    counting newlines (memory speed), so each split knows its first line number."""
    size = path.stat().st_size
    out, start, first_line = [], 0, 1
    line, offset = 1, 0  # line number at `offset`, the start of the current block
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            pos = 0  # newlines before `pos` in this block are counted in `line`
            while True:
                target = start + split_bytes - 1 - offset  # a newline here or later ends the split
                if target >= len(block):
                    break
                cut = block.find(b"\n", max(target, pos))
                if cut < 0 or offset + cut + 1 >= size:
                    break
                line += block.count(b"\n", pos, cut + 1)
                pos = cut + 1
                out.append(Split(str(path), start, offset + pos, first_line))
                start, first_line = offset + pos, line
            line += block.count(b"\n", pos)
            offset += len(block)
    out.append(Split(str(path), start, size, first_line))
    return out
