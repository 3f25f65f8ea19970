"""The one JSONL reader: plain, .gz and .zst files, every record located as `file:line`.

Curation, tokenization and the chat data of post-training all read through `records`. A bad
line (invalid UTF-8, not JSON, not an object, longer than `max_line_bytes`) goes to
`on_bad(where, reason, kind)`, which counts it or raises. A compressed file that ends early
(a copy cut short, a full disk) is reported the same way, as kind `truncated`, naming the last
good line; the rest of that file is unreadable, so reading stops there. zstandard's stream
reader ends silently on a cut-off frame, so .zst is decompressed frame by frame here and
checked for an unfinished frame at the end.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from kiln.data.splits import Split
from kiln.errors import InputError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
OnBad = Callable[[str, str, str], None]  # (where, reason, kind)


class Truncated(Exception):
    """A compressed stream that ended inside a frame."""


def raise_on_bad(where: str, reason: str, kind: str) -> None:
    raise InputError(f"{where}: {reason}")


def files(paths: list[str]) -> list[Path]:
    """The JSONL files named by `paths`: files as given, directories expanded to their JSONL
    files in name order (a curated output directory, for example)."""
    out = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES) and not p.name.startswith("."))
            if not found:
                raise InputError(f"{path} holds no JSONL files ({', '.join(SUFFIXES)})")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise InputError(f"{path} does not exist: give a JSONL file (.jsonl, .gz, .zst) or a directory of them")
    return out


def _zstd_blocks(f, size: int = 1 << 20) -> Iterator[bytes]:
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, fed = decompressor.decompressobj(), False
    while block := f.read(size):
        while block:
            fed = True
            out = frame.decompress(block)
            if out:
                yield out
            if frame.eof:  # a file may hold several frames (pzstd, concatenated files)
                block, frame, fed = frame.unused_data, decompressor.decompressobj(), False
            else:
                block = b""
    if fed and not frame.eof:
        raise Truncated


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _byte_range(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (line := f.readline(left)):
            left -= len(line)
            yield line


def raw_lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The file's lines as bytes (of an uncompressed file: those in [start, end)); raises
    Truncated when a compressed file ends early."""
    name = path.name
    if start or end is not None:
        if name.endswith((".gz", ".zst")):
            raise ValueError(f"{path}: a compressed file is read whole, not from byte {start}")
        yield from _byte_range(path, start, path.stat().st_size if end is None else end)
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                yield from f
        elif name.endswith(".zst"):
            with open(path, "rb") as f:
                yield from _split_lines(_zstd_blocks(f))
        else:
            with open(path, "rb") as f:
                yield from f
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise Truncated(str(exc)) from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":  # a corrupt frame: the same as a cut-off one here
            raise Truncated(str(exc)) from None
        raise


def records(path: str | Path, on_bad: OnBad = raise_on_bad, max_line_bytes: int | None = None,
            split: Split | None = None) -> Iterator[tuple[str, dict]]:
    """(file:line, record) for every well-formed JSON object line of `path` (or of one split of it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: give a JSONL file with one record per line")
    split = split or Split(str(path))
    lineno = split.first_line - 1
    try:
        for lineno, raw in enumerate(raw_lines(path, split.start, split.end), split.first_line):  # noqa: B007 -- lineno names the last good line
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            if max_line_bytes and len(raw) > max_line_bytes:
                on_bad(where, f"line of {len(raw)} bytes exceeds max_line_bytes={max_line_bytes}", "too_long")
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                on_bad(where, f"invalid UTF-8 ({exc.reason}); re-encode the file as UTF-8", "bad_utf8")
                continue
            except json.JSONDecodeError as exc:
                on_bad(where, f"not valid JSON ({exc.msg}); each line must be one JSON object", "bad_json")
                continue
            if not isinstance(record, dict):
                on_bad(where, "a line must be a JSON object", "bad_json")
                continue
            yield where, record
    except Truncated as exc:
        detail = f" ({exc})" if str(exc) else ""
        on_bad(f"{path}:{lineno}", f"truncated: the compressed file ends early after line {lineno}{detail}; "
                                   f"the lines after it are lost: copy the file again", "truncated")
