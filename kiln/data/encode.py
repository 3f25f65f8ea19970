"""JSONL text -> token ids -> Megatron indexed dataset, in bounded blocks.

The unit of work is a `Split` (kiln.data.splits): a whole file, or a byte range of an
uncompressed one. `tokenize_split` writes one split's `<prefix>.bin/.idx`; `tokenize_splits`
writes several into one dataset, which is what `kiln prepare` does over its input files.
Merging per-split datasets in order with megatron-core's `IndexedDatasetBuilder.add_index`
(`kiln.data.indexed.merge`) gives the same bytes as `tokenize_splits` over the same splits.

Each block of about `BLOCK` bytes of whole lines is parsed (orjson; a line it refuses is
parsed again by `json` so that the accepted input and the error messages are exactly those of
`kiln.data.jsonl.records`), its non-empty text fields are tokenized in one batch, one EOD id is
appended per document and the block is written, while the next block is parsed in a thread.
Memory holds two blocks, one block's ids and gigatoken's pretoken cache (bounded, CACHE_BYTES),
nothing per document: inputs larger than RAM stream.

Backends: `gigatoken` (Rust, SIMD pretokenizer, all cores) where it loads the tokenizer and gives
the ids of `tokenizers` on a check sample, else `tokenizers` (`encode_batch_fast`). gigatoken's
own JSONL reader is not used: it skips malformed lines, missing and non-string fields silently and
takes the first of duplicate keys, where kiln stops with file:line (and JSON takes the last).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kiln.data import jsonl
from kiln.data import tokenizer as tok
from kiln.data.indexed import IndexedWriter, optimal_dtype
from kiln.data.splits import Split
from kiln.errors import InputError

BLOCK = 16 << 20  # bytes of JSONL parsed and tokenized at a time
CACHE_BYTES = 1 << 30  # gigatoken's pretoken cache grows with every new word: rebuilt past this much RSS growth
CHECK_BYTES = 64 << 10  # text of the first documents encoded by both backends before gigatoken is trusted
BACKENDS = ("auto", "gigatoken", "tokenizers")
HELDOUT = "heldout.jsonl"  # in a prepared dataset: the documents set aside for evaluation
# encoded by both backends too: what differs between tokenizer implementations if anything does
PROBES = ["Hello world", " leading space", "trailing space ", "  double  spaces\t\ttabs\n\nnewlines\r\n",
          "<|endoftext|> inside text <|im_start|>", "caf\u00e9 na\u00efve \u00fcber", "\u65e5\u672c\u8a9e\u306e"
          "\u30c6\u30ad\u30b9\u30c8", "emoji \U0001F600\U0001F680 and \u200b zero width", "x" * 3000,
          "def f(x):\n    return x ** 2  # comment\n", "1234567890 3.14159 -42 1e-9", "\u0000\u0001 controls",
          "'s 't 're 've 'm 'll 'd", "https://example.com/a?b=c&d=e#f"]


# ---- reading ----

def _blocks(split: Split, block: int | None = None, limit: int | None = None
            ) -> Iterator[tuple[int, list[bytes], int]]:
    """(number of the first line, the lines without their newlines, their bytes with newlines) of
    `split`, about `block` (default BLOCK) bytes at a time; with `limit`, only the lines up to the
    first line end at or past `limit` bytes."""
    path, block = Path(split.path), block or BLOCK
    if path.name.endswith((".gz", ".zst")):
        if split.start or split.end is not None:
            raise ValueError(f"{path}: a compressed file is read whole, not from byte {split.start}")
        chunks = _compressed_blocks(path, block)
    else:
        chunks = _plain_blocks(path, split, block)
    read = 0
    for first, lines, size in chunks:
        if limit is not None and read + size >= limit:
            kept, left = [], limit - read
            for line in lines:
                kept.append(line)
                left -= len(line) + 1
                if left <= 0:
                    break
            yield first, kept, sum(map(len, kept)) + len(kept)
            return
        read += size
        yield first, lines, size


def _plain_blocks(path: Path, split: Split, block: int) -> Iterator[tuple[int, list[bytes], int]]:
    line = split.first_line
    with open(path, "rb") as f:
        f.seek(split.start)
        left = (os.fstat(f.fileno()).st_size if split.end is None else split.end) - split.start
        rest = b""
        while left > 0 and (data := f.read(min(block, left))):
            left -= len(data)
            size = len(data) + len(rest)
            lines = (rest + data if rest else data).split(b"\n")
            rest = lines.pop() if left > 0 else b""  # the last line continues in the next read
            size -= len(rest)
            if left <= 0 and lines and not lines[-1]:
                lines.pop()  # the file's last newline ends the last line, it starts none
            if lines:
                yield line, lines, size
                line += len(lines)
        if rest:  # the file ended early (it shrank while read)
            yield line, [rest], len(rest)


def _compressed_blocks(path: Path, block: int) -> Iterator[tuple[int, list[bytes], int]]:
    lines, size, first, lineno = [], 0, 1, 0
    try:
        for lineno, raw in enumerate(jsonl.raw_lines(path), 1):  # noqa: B007 -- names the last good line
            lines.append(raw[:-1] if raw.endswith(b"\n") else raw)
            size += len(raw)
            if size >= block:
                yield first, lines, size
                lines, size, first = [], 0, lineno + 1
    except jsonl.Truncated as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise InputError(f"{path}:{lineno}: truncated: the compressed file ends early after line {lineno}{detail}; "
                         f"the lines after it are lost: copy the file again") from None
    if lines:
        yield first, lines, size


def _loads():
    try:
        import orjson

        return orjson.loads, orjson.JSONDecodeError
    except ImportError:  # orjson is an optional speed-up
        return json.loads, ValueError


def _texts(path: str, first_line: int, lines: list[bytes], text_field: str) -> list[str]:
    """The non-empty `text_field` of every line; a malformed line raises InputError naming
    file:line, with the reasons and fixes of `jsonl.records` and `kiln prepare`."""
    loads, error = _loads()
    texts = []
    for i, raw in enumerate(lines, first_line):
        try:
            record = loads(raw)
        except error:
            record = _strict(f"{path}:{i}", raw)
            if record is None:
                continue
        if type(record) is not dict:
            raise InputError(f"{path}:{i}: a line must be a JSON object")
        text = record.get(text_field)
        if type(text) is not str:
            raise InputError(f"{path}:{i}: field {text_field!r} is missing or not a string; set text_field to the "
                             f"field that holds the document text")
        if text:
            texts.append(text)
    return texts


def _strict(where: str, raw: bytes):
    """What `jsonl.records` makes of a line orjson refused: None for a blank line, the record when
    `json` accepts it (NaN, huge integers, lone surrogate escapes), else its InputError."""
    if not raw.strip():
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: invalid UTF-8 ({exc.reason}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    if isinstance(record, dict):
        for key, value in record.items():
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise InputError(f"{where}: field {key!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                                     f"which is no text; fix the writer of this file") from None
    return record


class Block(NamedTuple):
    where: str  # file:line of its first line
    lines: int
    bytes: int
    texts: list[str]  # the non-empty text fields, in order


def blocks(split: Split, text_field: str, limit: int | None = None) -> Iterator[Block]:
    """The blocks of `split` with their texts; with `limit`, only the lines up to the first line
    end at or past `limit` bytes (the head of the file)."""
    for first, lines, size in _blocks(split, limit=limit):
        yield Block(f"{split.path}:{first}", len(lines), size, _texts(split.path, first, lines, text_field))


def check_sample(files: list[Path], text_field: str) -> list[str]:
    """The first texts of the input, about CHECK_BYTES: what `Encoder.decide` compares the backends
    on (the same for the local engine and a Ray driver, so both pick the same backend)."""
    texts, size = [], 0
    for path in files:
        for block in blocks(Split(str(path)), text_field, limit=CHECK_BYTES):
            for text in block.texts:
                texts.append(text[: CHECK_BYTES - size])
                size += len(texts[-1])
                if size >= CHECK_BYTES:
                    return texts
    return texts


# ---- tokenizing ----

def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


class Encoder:
    """Token ids of documents, one EOD each, from a tokenizer directory. `backend` "auto" picks
    gigatoken when it loads the tokenizer and agrees with `tokenizers` on PROBES and the first
    CHECK_BYTES of text it is given (checked on the first `encode`); `check` says what was
    compared, or why gigatoken is not used."""

    def __init__(self, tokenizer_dir: str | os.PathLike, backend: str = "auto", batch_size: int = 1000):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
        described = tok.describe(tokenizer_dir)
        self.reference, self.vocab_size, self.eod = described.backend, described.vocab_size, described.eod_id
        self.dtype = optimal_dtype(self.vocab_size)
        self.backend, self.batch_size, self.check, self._giga = backend, batch_size, "", None
        self.cache_resets, self._rss_limit = 0, None
        if backend == "tokenizers":
            self.check = "tokenizers chosen"
            return
        try:
            self._giga = self._gigatoken()
        except Exception as exc:  # noqa: BLE001 -- whatever gigatoken refuses, tokenizers encodes
            if backend == "gigatoken":
                raise InputError(f"gigatoken cannot load the tokenizer in {tokenizer_dir}: {exc}") from exc
            self.backend, self.check = "tokenizers", f"gigatoken cannot load it ({type(exc).__name__}: {exc})"
        else:
            if backend == "gigatoken":
                self.check = "gigatoken chosen"

    def _gigatoken(self):
        import gigatoken

        return gigatoken.Tokenizer(self.reference)

    def _bound_cache(self) -> None:
        """gigatoken keeps every pretoken it has seen (8-9 bytes of memory per input byte on text
        of all-new words, far less on real text, but without end): past CACHE_BYTES of growth the
        tokenizer is rebuilt, which frees the cache and changes no id."""
        import psutil

        rss = psutil.Process().memory_info().rss
        if self._rss_limit is None:
            self._rss_limit = rss + CACHE_BYTES
        elif rss > self._rss_limit:
            self._giga = None
            self._giga = self._gigatoken()
            self.cache_resets += 1

    def decide(self, texts: list[str]) -> str:
        """Settle "auto" on `texts` (a driver's sample of the input) and return the backend, for
        `tokenize_split(..., backend=...)` of every split."""
        if self.backend == "auto":
            self._check(texts)
        return self.backend

    def _check(self, texts: list[str]) -> None:
        sample, size = [], 0
        for text in texts:
            if size >= CHECK_BYTES:
                break
            sample.append(text[: CHECK_BYTES - size])
            size += len(sample[-1])
        docs = [*PROBES, *sample]
        versions = f"gigatoken {_version('gigatoken')} vs tokenizers {_version('tokenizers')}"
        theirs = self._encode_tokenizers(docs)[0]
        try:
            ours = self._encode_giga(docs)[0]
        except Exception as exc:  # noqa: BLE001 -- a refusal on real text is a reason not to use it
            self.backend, self._giga = "tokenizers", None
            self.check = f"{versions}: gigatoken failed on the check sample ({type(exc).__name__}: {exc})"
            return
        if np.array_equal(ours, theirs):
            self.backend = "gigatoken"
            self.check = (f"{versions}: equal ids on {len(PROBES)} probes and the first {len(sample)} documents "
                          f"({size} characters)")
        else:
            self.backend, self._giga = "tokenizers", None
            self.check = f"{versions}: ids differ on the check sample; using tokenizers"

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of every document followed by EOD, concatenated, in the dataset's dtype; lengths)."""
        if self.backend == "auto":
            self._check(texts)
        if not texts:
            return np.empty(0, self.dtype), np.empty(0, np.int64)
        if self.backend == "gigatoken":
            return self._encode_giga(texts)
        return self._encode_tokenizers(texts)

    def _with_eod(self, flat: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.insert(flat, np.cumsum(counts), self.eod)  # EOD after each document
        return ids.astype(self.dtype, copy=False), counts + 1

    def _encode_giga(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import awkward as ak

        encoded = self._giga.encode_batch(texts)
        ids, counts = ak.flatten(encoded).to_numpy(), ak.num(encoded).to_numpy().astype(np.int64)
        del encoded
        self._bound_cache()
        return self._with_eod(ids, counts)

    def _encode_tokenizers(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        counts, parts = [], []
        for start in range(0, len(texts), self.batch_size):
            encodings = self.reference.encode_batch_fast(texts[start:start + self.batch_size],
                                                         add_special_tokens=False)
            ids = [e.ids for e in encodings]
            counts += map(len, ids)
            parts.append(np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=sum(map(len, ids))))
        flat = np.concatenate(parts) if parts else np.empty(0, np.uint32)
        return self._with_eod(flat, np.asarray(counts, dtype=np.int64))


def _ahead(items: Iterator) -> Iterator:
    """`items`, the next one produced in a thread while this one is used: JSON parsing (which holds
    the GIL) overlaps tokenizing (which releases it). Errors surface in order."""
    with ThreadPoolExecutor(1) as pool:
        done = object()
        pending = pool.submit(next, items, done)
        while (item := pending.result()) is not done:
            pending = pool.submit(next, items, done)
            yield item


def held_out(text: str, fraction: float) -> bool:
    """Whether a document is set aside for evaluation: decided by its text's hash alone, so the
    choice does not depend on file order, splits or engine, and copies of a document are never
    split between training and evaluation."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") < fraction * 2**64


def tokenize_splits(splits: list[Split], encoder: Encoder, text_field: str, prefix: str | os.PathLike,
                    heldout: float = 0.0) -> dict:
    """Tokenize `splits` in order into one `<prefix>.bin/.idx`; returns {documents, tokens, backend,
    backend_check, cache_resets, heldout}. With `heldout` > 0 the documents `held_out` picks are not
    tokenized but written, in order, to `<prefix>.heldout.jsonl` ({"text": ...} per line). A
    malformed line raises InputError (file:line) and leaves no output."""
    aside = open(f"{prefix}.heldout.jsonl", "w") if heldout else None
    set_aside = 0
    try:
        with IndexedWriter(prefix, encoder.dtype) as writer:
            for block in _ahead(chain.from_iterable(blocks(split, text_field) for split in splits)):
                texts = block.texts
                if aside is not None:
                    kept = [t for t in texts if not held_out(t, heldout)]
                    for text in (t for t in texts if held_out(t, heldout)):
                        aside.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    set_aside += len(texts) - len(kept)
                    texts = kept
                if texts:
                    writer.add(*encoder.encode(texts))
    except BaseException:
        if aside is not None:
            aside.close()
            os.unlink(aside.name)
        raise
    if aside is not None:
        aside.close()
    return {"documents": writer.documents, "tokens": writer.tokens, "backend": encoder.backend,
            "backend_check": encoder.check, "cache_resets": encoder.cache_resets, "heldout": set_aside}


def tokenize_split(split: Split, tokenizer_dir: str | os.PathLike, text_field: str, prefix: str | os.PathLike,
                   batch_size: int = 1000, backend: str = "auto", heldout: float = 0.0) -> dict:
    """One split -> `<prefix>.bin/.idx` (one task of a distributed prepare). Pass the `backend`
    the driver chose (`kiln.data.prepare.encoder(...).backend`: `Encoder.decide` on `check_sample`)
    so every split uses the same one; "auto" checks on this split's first documents. Returns
    {documents, tokens, backend, backend_check, cache_resets, heldout}."""
    return tokenize_splits([split], Encoder(str(tokenizer_dir), backend, batch_size), text_field, prefix, heldout)
