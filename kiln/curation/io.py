"""Reading raw corpora (JSONL plain, .gz or .zst; Parquet; WARC and HTML, with the main text
extracted by trafilatura) and writing curated shards.

Every document keeps its id (the id field, or `<file>:<line>`) and its source file. Bad input
(malformed JSON, invalid UTF-8, a missing or non-string text field, an empty document, an
over-long line) is counted and located by file and line, then skipped, or stops the run with
`strict`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.config import CurateConfig
from kiln.data import jsonl
from kiln.data.splits import Split
from kiln.errors import CurationInputError


@dataclass
class Document:
    id: str
    source: str
    text: str


@dataclass
class BadInput:
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first 20, as file:line: reason

    def add(self, where: str, reason: str, kind: str, strict: bool) -> None:
        if strict:
            raise CurationInputError(f"{where}: {reason} (strict=false skips and counts such records)")
        self.counts[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CurationInputError(f"{path}: reading Parquet needs pyarrow (pip install 'kiln[curate]')") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield row, record


RAW_SUFFIXES = (*jsonl.SUFFIXES, ".parquet", ".warc", ".warc.gz", ".html", ".htm")


def input_files(paths: list[str]) -> list[Path]:
    """Files as given; a directory stands for its raw files in name order."""
    out = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.name.endswith(RAW_SUFFIXES) and not p.name.startswith("."))
        elif path.is_file():
            out.append(path)
        else:
            raise CurationInputError(f"inputs: {path} does not exist or is not a file")
    return out


def read_documents(cfg: CurateConfig, bad: BadInput, splits: list[Split] | None = None) -> Iterator[Document]:
    """The usable documents of the inputs (or of the given contiguous splits of them), in order."""
    for split in splits or [Split(str(p)) for p in input_files(cfg.inputs)]:
        path = Path(split.path)
        if path.suffix == ".parquet":
            records = ((f"{path}:row {row}", record) for row, record in _parquet_records(path))
        elif path.name.endswith((".warc", ".warc.gz", ".html", ".htm")):
            records = _web_records(path, cfg, bad)
        else:
            records = _json_records(path, cfg, bad, split)
        for where, record in records:
            text = record.get(cfg.text_field)
            if not isinstance(text, str):
                bad.add(where, f"field {cfg.text_field!r} is missing or not a string; set text_field", "no_text",
                        cfg.strict)
                continue
            if not text.strip():
                bad.add(where, "empty document", "empty", cfg.strict)
                continue
            doc_id = record.get(cfg.id_field) if cfg.id_field else None
            yield Document(str(doc_id) if doc_id is not None else where, str(path), text)


def _web_records(path: Path, cfg: CurateConfig, bad: BadInput) -> Iterator[tuple[str, dict]]:
    """WARC response records (or one HTML file) -> {id, text} with the page's main text."""
    import trafilatura

    if path.suffix in (".html", ".htm"):
        pages = [(str(path), path.read_bytes())]
    else:
        pages = _warc_pages(path)
    for where, html in pages:
        text = trafilatura.extract(html.decode("utf-8", errors="replace"), include_comments=False)
        if not text:
            bad.add(where, "no main text could be extracted from the HTML", "no_text", cfg.strict)
            continue
        yield where, {cfg.text_field: text, **({cfg.id_field: where} if cfg.id_field else {})}


def _warc_pages(path: Path) -> Iterator[tuple[str, bytes]]:
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response":
                continue
            content_type = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
            if "html" not in content_type:
                continue
            uri = record.rec_headers.get_header("WARC-Target-URI")
            yield f"{path}:{uri}", record.content_stream().read()


def _json_records(path: Path, cfg: CurateConfig, bad: BadInput, split: Split) -> Iterator[tuple[str, dict]]:
    return jsonl.records(path, lambda where, reason, kind: bad.add(where, reason, kind, cfg.strict),
                         cfg.max_line_bytes, split)


def shard_name(index: int, fmt: str) -> str:
    return f"curated_{index:05d}.{fmt}"


def write_shard(path: Path, documents: list[Document], fmt: str) -> None:
    rows = [{"id": d.id, "source": d.source, "text": d.text} for d in documents]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def shard_ends(sizes: np.ndarray, shard_bytes: int) -> list[int]:
    """Where each shard ends, given the kept documents' text sizes in order: a shard closes once
    its text reaches `shard_bytes` (the rule write_shards applies while streaming)."""
    total = np.cumsum(sizes, dtype=np.int64)
    ends, start = [], 0
    while start < len(sizes):
        base = total[start - 1] if start else 0
        end = int(np.searchsorted(total, base + shard_bytes, side="left")) + 1
        ends.append(min(end, len(sizes)))
        start = ends[-1]
    return ends


def write_shards(directory: Path, documents: Iterator[Document], shard_bytes: int, fmt: str = "jsonl") -> list[str]:
    """curated_00000.jsonl (or .parquet), ... in `directory` (a temp dir the caller renames when
    complete); a shard closes once its text reaches `shard_bytes`."""
    shards: list[str] = []
    batch: list[Document] = []
    size = 0

    def flush():
        shards.append(shard_name(len(shards), fmt))
        write_shard(directory / shards[-1], batch, fmt)

    for doc in documents:
        batch.append(doc)
        size += len(doc.text.encode())
        if size >= shard_bytes:
            flush()
            batch, size = [], 0
    if batch:
        flush()
    return shards
