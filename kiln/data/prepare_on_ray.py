"""`kiln prepare engine=ray`: one task per contiguous input split writes its own indexed
dataset; the driver merges them in input order with megatron-core's `add_index` into the one
prefix the local engine writes, byte for byte (or, with merge=false, keeps one prefix per
split, to list in `data.blend`).

The driver makes the tokenizer first (trained on the local engine's bounded sample, or
copied) into the work directory every node sees, and picks the encoding backend once, so
every task encodes with the same one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from kiln.config import PrepareConfig
from kiln.data import encode, indexed
from kiln.data import splits as input_splits
from kiln.data.encode import HELDOUT
from kiln.data.splits import Split
from kiln.ray import tasks as ray_tasks
from kiln.ray.connect import connected


def claim_work_dir(cfg: PrepareConfig, files: list[Path]) -> tuple[Path, list[Split]]:
    """The run's work directory (reused only by a rerun of the same inputs and config) and splits."""
    work = Path(cfg.ray.work_dir or f"{Path(cfg.output_dir).absolute()}.work")
    splits = input_splits.plan(files, int(cfg.ray.split_mb * 2**20))
    fields = dataclasses.asdict(cfg)
    for name in ("output_dir", "engine", "merge"):
        fields.pop(name)
    fields["ray"] = {"split_mb": cfg.ray.split_mb}
    ray_tasks.claim(work, {"config": fields, "inputs": ray_tasks.input_stats(files),
                           "splits": [dataclasses.astuple(s) for s in splits]}, "prepare")
    return work, splits


def tokenize(cfg: PrepareConfig, work: Path, splits: list[Split], backend: str, out: Path) -> dict:
    """Encode every split on the cluster, then write `<out>/<name>_text_document` (or one prefix
    per split). Returns {documents, tokens, cache_resets, prefixes, engine}."""
    parts = work / "parts"
    parts.mkdir(exist_ok=True)
    with connected(cfg.ray, os.cpu_count() or 1) as address:
        results, phase = ray_tasks.run("prepare", [
            ray_tasks.Task(f"tokenize-{i:05d}", str(split), encode_split,
                           (split, str(work / "tokenizer"), cfg.text_field, str(parts / f"{i:05d}"), cfg.batch_size,
                            backend, cfg.heldout))
            for i, split in enumerate(splits)], work, cfg.ray.max_task_retries, counter="tokens")
    name = f"{cfg.name}_text_document"
    if cfg.merge:
        indexed.merge([parts / f"{i:05d}" for i in range(len(splits))], out / name)
        prefixes = [name]
    else:
        prefixes = [f"{name}_{i:05d}" for i in range(len(splits))]
        for i, prefix in enumerate(prefixes):
            for suffix in (".bin", ".idx"):
                os.replace(parts / f"{i:05d}{suffix}", out / f"{prefix}{suffix}")
    if cfg.heldout:  # in split order: the bytes the local engine writes
        with open(out / HELDOUT, "wb") as merged:
            for i in range(len(splits)):
                with open(parts / f"{i:05d}.heldout.jsonl", "rb") as part:
                    shutil.copyfileobj(part, merged)
    return {**{k: sum(r[k] for r in results) for k in ("documents", "tokens", "cache_resets", "heldout")},
            "prefixes": prefixes,
            "engine": {"name": "ray", "address": address, "splits": len(splits), **phase.as_dict()}}


def encode_split(split: Split, tokenizer_dir: str, text_field: str, prefix: str, batch_size: int,
                 backend: str, heldout: float = 0.0) -> dict:
    """One task: the split's indexed dataset (and held-out documents) under temp names, renamed once
    every file is complete."""
    tmp = f"{prefix}.tmp-{os.getpid()}"
    result = encode.tokenize_split(split, tokenizer_dir, text_field, tmp, batch_size, backend, heldout)
    for suffix in (".bin", ".idx", *([".heldout.jsonl"] if heldout else [])):
        os.replace(f"{tmp}{suffix}", f"{prefix}{suffix}")
    return {k: result[k] for k in ("documents", "tokens", "backend", "cache_resets", "heldout")}
