"""`kiln prepare`: tokenize a JSONL `text` field into a Megatron indexed dataset.

The input is read in blocks, tokenized by gigatoken where it supports the tokenizer (else by
`tokenizers`), one EOD token is appended to each document and the .bin/.idx pair is written in
chunks, byte for byte what megatron-core's IndexedDatasetBuilder writes (kiln.data.encode,
kiln.data.indexed). A tokenizer trained here learns from a bounded, deterministic sample: the
head of each input file in proportion to its size. Everything lands in a temp directory renamed
when complete; the manifest says which backend ran and what the tokenizer was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from kiln.artifact import atomic_dir, atomic_write_text, write_manifest
from kiln.config import PrepareConfig
from kiln.data import encode, jsonl
from kiln.data import tokenizer as tok
from kiln.data.splits import Split
from kiln.errors import InputError
from kiln.validation import Check, Problems, check_inputs, check_output_dir, check_ranges, ensure_valid


def read_texts(paths: list[str], field: str) -> Iterator[str]:
    """Yield each record's non-empty `field`, failing with file:line on malformed records."""
    for path in jsonl.files(paths):
        for block in encode.blocks(Split(str(path)), field):
            yield from block.texts


def training_sample(files: list[Path], field: str, limit_mb: float, record: dict,
                    heldout: float = 0.0) -> Iterator[str]:
    """The texts a tokenizer is trained on: of each file, the lines up to the first line end at or
    past its share of `limit_mb` MiB (shares in proportion to file sizes on disk; a compressed
    file's share counts decompressed bytes); everything when the inputs are smaller. `record`
    is filled with what was read, for the manifest. Held-out documents are left out: the tokenizer
    never sees the text it is evaluated on."""
    sizes = [f.stat().st_size for f in files]
    limit = int(limit_mb * 2**20)
    whole = sum(sizes) <= limit
    record.update(limit_mb=limit_mb, whole_input=whole, documents=0, bytes=0, files=[])
    for path, size in zip(files, sizes, strict=True):
        share = None if whole else limit * size // max(sum(sizes), 1)
        entry = {"path": str(path), "bytes": 0, "lines": 0, "documents": 0}
        record["files"].append(entry)
        if share == 0:
            continue
        for block in encode.blocks(Split(str(path)), field, limit=share):
            entry["bytes"] += block.bytes
            entry["lines"] += block.lines
            texts = [t for t in block.texts if not (heldout and encode.held_out(t, heldout))]
            entry["documents"] += len(texts)
            yield from texts
        record["documents"] += entry["documents"]
        record["bytes"] += entry["bytes"]


def validate(cfg: PrepareConfig, check: Check, problems: Problems) -> None:
    check_ranges(cfg, problems)
    check_inputs("inputs", cfg.inputs, "JSONL files (.jsonl, .gz, .zst) with a text field, or directories of them",
                 check, problems)
    if cfg.tokenizer and not check.will_exist(cfg.tokenizer):
        check.missing(problems,
                      f"tokenizer={cfg.tokenizer} does not exist: give a Hugging Face tokenizer directory, or leave "
                     f"it unset to train a byte-level BPE")
    check_output_dir("output_dir", cfg.output_dir, problems)


def make_tokenizer(cfg: PrepareConfig, files: list[Path], tok_dir: Path) -> dict | None:
    """Copy the given tokenizer into `tok_dir`, or train one there on the bounded sample; returns
    the sample's record for the manifest (None when the tokenizer was given)."""
    if cfg.tokenizer:
        tok.copy(cfg.tokenizer, tok_dir)
        return None
    sample: dict = {}
    tok.train_bpe(training_sample(files, cfg.text_field, cfg.tokenizer_sample_mb, sample, cfg.heldout),
                  cfg.vocab_size, tok_dir)
    return sample


def encoder(cfg: PrepareConfig, files: list[Path], tok_dir: Path, backend: str = "auto") -> encode.Encoder:
    """The encoder every split uses, its backend settled on the input's first documents."""
    chosen = encode.Encoder(tok_dir, backend, cfg.batch_size)
    chosen.decide(encode.check_sample(files, cfg.text_field))
    return chosen


def prepare(cfg: PrepareConfig, backend: str = "auto") -> dict:
    """Run the stage; returns the summary written into the manifest. `backend`: "auto" (gigatoken
    where it supports the tokenizer and agrees with `tokenizers` on a check sample), "gigatoken"
    or "tokenizers"; the output bytes are the same."""
    ensure_valid(cfg, validate, what="the prepare config")
    started = time.time()
    out = Path(cfg.output_dir)
    files = jsonl.files(cfg.inputs)
    with atomic_dir(out) as tmp:
        if cfg.engine == "ray":  # the tokenizer goes where every node sees it, and survives a resume
            from kiln.data import prepare_on_ray

            work, splits = prepare_on_ray.claim_work_dir(cfg, files)
            tok_dir, made = work / "tokenizer", work / "tokenizer.done.json"
            if made.exists():
                sample = json.loads(made.read_text())
            else:
                shutil.rmtree(tok_dir, ignore_errors=True)
                sample = make_tokenizer(cfg, files, tok_dir)
                atomic_write_text(made, json.dumps(sample))
        else:
            tok_dir = tmp / "tokenizer"
            sample = make_tokenizer(cfg, files, tok_dir)
        trained = time.time()
        chosen = encoder(cfg, files, tok_dir, backend)
        prefix = tmp / f"{cfg.name}_text_document"
        if cfg.engine == "ray":
            counts = prepare_on_ray.tokenize(cfg, work, splits, chosen.backend, tmp)
            counts.update(backend=chosen.backend, backend_check=chosen.check)
            shutil.copytree(tok_dir, tmp / "tokenizer")
        else:
            counts = encode.tokenize_splits([Split(str(f)) for f in files], chosen, cfg.text_field, prefix,
                                            cfg.heldout)
            if cfg.heldout:
                os.replace(f"{prefix}.heldout.jsonl", tmp / encode.HELDOUT)
        if counts["documents"] == 0:
            raise InputError(f"no non-empty documents in {', '.join(map(str, cfg.inputs))}")
        tokenized = time.time()
        summary = {
            "documents": counts["documents"],
            "tokens": counts["tokens"],
            "vocab_size": chosen.vocab_size,
            "eod_id": chosen.eod,
            "prefix": str(out / prefix.name),
            "tokenizer": str(out / "tokenizer"),
            "backend": counts["backend"],
            "backend_check": counts["backend_check"],
            "cache_resets": counts["cache_resets"],  # gigatoken rebuilt to bound its memory (encode.CACHE_BYTES)
            "tokenizer_sample": sample,  # None: the tokenizer was given
            # documents set aside for `kiln eval` (never tokenized, so never trained on)
            "heldout": {"fraction": cfg.heldout, "documents": counts["heldout"],
                        "path": str(out / encode.HELDOUT)} if cfg.heldout else None,
            "seconds": round(tokenized - started, 3),
            "tokenizer_seconds": round(trained - started, 3),  # copying or training the tokenizer
            "tokens_per_second": round(counts["tokens"] / max(tokenized - trained, 1e-9)),  # reading to .bin/.idx
        }
        if cfg.engine == "ray":
            summary.update(prefixes=[str(out / p) for p in counts["prefixes"]], engine=counts["engine"])
            if not cfg.merge:
                del summary["prefix"]
        write_manifest(tmp, "prepare", cfg, [*files, *([cfg.tokenizer] if cfg.tokenizer else [])], summary, started)
    if cfg.engine == "ray":
        shutil.rmtree(work)
    return summary
