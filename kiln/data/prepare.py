"""`kiln prepare`: tokenize a JSONL `text` field into a Megatron indexed dataset.

Documents are tokenized in batches by the Rust `tokenizers` backend (its batched
call is several times faster than one transformers call per document), one EOD
token is appended to each, and megatron-core's IndexedDatasetBuilder writes the
.bin/.idx pair. Everything lands in a temp directory renamed when complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kiln.artifact import atomic_dir, write_manifest
from kiln.config import PrepareConfig
from kiln.data import jsonl
from kiln.data import tokenizer as tok
from kiln.errors import InputError
from kiln.validation import Check, Problems, check_inputs, check_output_dir, check_ranges, ensure_valid


def read_texts(paths: list[str], field: str) -> Iterator[str]:
    """Yield each record's `field`, failing with file:line on malformed records."""
    for path in jsonl.files(paths):
        for where, record in jsonl.records(path):
            text = record.get(field)
            if not isinstance(text, str):
                raise InputError(f"{where}: field {field!r} is missing or not a string; set text_field to the field "
                                 f"that holds the document text")
            if text:
                yield text


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def validate(cfg: PrepareConfig, check: Check, problems: Problems) -> None:
    check_ranges(cfg, problems)
    check_inputs("inputs", cfg.inputs, "JSONL files (.jsonl, .gz, .zst) with a text field, or directories of them",
                 check, problems)
    if cfg.tokenizer and not check.will_exist(cfg.tokenizer):
        check.missing(problems,
                      f"tokenizer={cfg.tokenizer} does not exist: give a Hugging Face tokenizer directory, or leave "
                     f"it unset to train a byte-level BPE")
    check_output_dir("output_dir", cfg.output_dir, problems)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the stage; returns the summary written into the manifest."""
    ensure_valid(cfg, validate, what="the prepare config")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.time()
    out = Path(cfg.output_dir)
    with atomic_dir(out) as tmp:
        tok_dir = tmp / "tokenizer"
        if cfg.tokenizer:
            tok.load(cfg.tokenizer).save_pretrained(str(tok_dir))
        else:
            tok.train_bpe(read_texts(cfg.inputs, cfg.text_field), cfg.vocab_size, tok_dir)
        hf = tok.load(tok_dir)
        eod = tok.eod_id(hf)
        backend = hf.backend_tokenizer
        dtype = np.uint16 if len(hf) < 65_500 else np.int32
        prefix = tmp / f"{cfg.name}_text_document"
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        docs = tokens = 0
        for batch in _batches(read_texts(cfg.inputs, cfg.text_field), cfg.batch_size):
            for encoding in backend.encode_batch_fast(batch, add_special_tokens=False):
                ids = encoding.ids
                ids.append(eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                tokens += len(ids)
            docs += len(batch)
        builder.finalize(f"{prefix}.idx")
        if docs == 0:
            raise InputError(f"no non-empty documents in {', '.join(map(str, cfg.inputs))}")
        elapsed = time.time() - started
        summary = {
            "documents": docs,
            "tokens": tokens,
            "vocab_size": len(hf),
            "eod_id": eod,
            "prefix": str(out / prefix.name),
            "tokenizer": str(out / "tokenizer"),
            "seconds": round(elapsed, 3),
            "tokens_per_second": round(tokens / max(elapsed, 1e-9)),
        }
        write_manifest(tmp, "prepare", cfg, [*jsonl.files(cfg.inputs), *([cfg.tokenizer] if cfg.tokenizer else [])],
                       summary, started)
    return summary
