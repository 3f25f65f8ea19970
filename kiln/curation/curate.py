"""`kiln curate`: read -> normalize -> filter (NeMo Curator) -> redact PII -> exact dedup ->
fuzzy dedup -> write shards.

Two passes with bounded memory: the first streams the inputs through worker processes in
chunks (normalized, redacted text is spilled to a temp file; only a 16-byte digest and a
MinHash signature per document stay in memory), the second streams the spill and writes the
kept documents. Output appears under its final name only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kiln.artifact import atomic_dir, atomic_write_text, write_manifest
from kiln.bootstrap import interactive
from kiln.config import CurateConfig
from kiln.curation import dedup
from kiln.curation.io import BadInput, Document, read_documents, write_shards
from kiln.curation.report import build_report, print_summary
from kiln.curation.screen import process_texts
from kiln.validation import Check, Problems, check_inputs, check_output_dir, check_ranges, ensure_valid

CHUNK = 512  # documents per worker task


def validate(cfg: CurateConfig, check: Check, problems: Problems) -> None:
    check_ranges(cfg, problems)
    check_inputs("inputs", cfg.inputs, "JSONL (.jsonl, .gz, .zst), Parquet, WARC or HTML files, or directories "
                 "of them", check, problems)
    for name in ("max_top_ngram_ratios", "max_duplicate_ngram_ratios"):
        for n, ratio in getattr(cfg.filters, name).items():
            if not str(n).isdigit() or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
                problems.add(f"filters.{name}: {n!r}: {ratio!r} must map an n-gram size to a ratio in [0, 1], "
                             f"e.g. {{\"2\": 0.2}}")
    if cfg.filters.min_words > cfg.filters.max_words:
        problems.add(f"filters.min_words={cfg.filters.min_words} is above filters.max_words={cfg.filters.max_words}")
    if cfg.dedup_backend == "gpu":
        from kiln.curation.gpu import cudf_available

        if not cudf_available():
            problems.add("dedup_backend=gpu needs cuDF (NeMo Curator's GPU extra, in the NGC image): use "
                         "dedup_backend=cpu or auto")
    if cfg.engine == "ray":
        if cfg.filters.enabled and cfg.filters.engine == "curator":
            problems.add("filters.engine=curator runs Curator's own Ray pipeline on one machine: with engine=ray use "
                         "filters.engine=kiln (the same filters, in kiln's tasks)")
        if cfg.dedup_backend == "gpu":
            problems.add("dedup_backend=gpu runs Curator's cuDF workflows on one machine: with engine=ray dedup runs "
                         "on CPU across the cluster; use dedup_backend=cpu or auto")
    check_output_dir("output_dir", cfg.output_dir, problems)


def _pool(workers: int):
    """Worker processes forked from a forkserver, not from this process: a process holding threads
    (a Ray cluster's gRPC clients, a tokenizer's pool) can fork a child that deadlocks on a lock
    one of them held (seen: a test process that had started Ray)."""
    context = get_context("forkserver")
    context.set_forkserver_preload(["kiln.curation.screen"])
    return context.Pool(workers)


def _chunks(iterable, size):
    it = iter(iterable)
    while chunk := list(islice(it, size)):
        yield chunk


def curate(cfg: CurateConfig) -> dict:
    ensure_valid(cfg, validate, what="the curate config")
    started = time.time()
    output = Path(cfg.output_dir)
    with atomic_dir(output) as tmp:
        if cfg.engine == "ray":
            from kiln.curation.on_ray import run_on_ray

            report = run_on_ray(cfg, tmp, started)
        else:
            report = _run_local(cfg, tmp, started)
        atomic_write_text(tmp / "curation_report.json", json.dumps(report, indent=2) + "\n")
    write_manifest(str(output), "curate", cfg, list(cfg.inputs), report, started)
    print_summary(report)
    return report


def _run_local(cfg: CurateConfig, tmp: Path, started: float) -> dict:
    """Worker processes of this machine: one pass spilling normalized text to `tmp`, dedup in
    memory (16 bytes and a signature per document), one pass writing the kept documents."""
    bad, pii_counts = BadInput(), Counter()
    stats = {"read": Counter(), "normalize": Counter(), "exact_dedup": Counter(), "fuzzy_dedup": Counter(),
             "gpu_dedup": Counter()}
    seconds = Counter()
    digests, signatures, verdicts, languages = [], [], [], Counter()
    spill = tmp / ".spill.jsonl"
    tic = time.perf_counter()
    progress = Progress(TextColumn("kiln curate"), BarColumn(), TextColumn("{task.completed} documents"),
                        TimeElapsedColumn(), transient=True, disable=not interactive())
    with open(spill, "w", encoding="utf-8") as f, get_context("fork").Pool(cfg.workers) as pool, progress:
        task = progress.add_task("read", total=None)
        # a window of chunks at a time: Pool.imap would read the whole input ahead
        for window in _chunks(_chunks(read_documents(cfg, bad), CHUNK), 2 * cfg.workers):
            args = [([d.text for d in chunk], cfg) for chunk in window]
            progress.advance(task, sum(len(chunk) for chunk in window))
            for chunk, result in zip(window, pool.starmap(process_texts, args), strict=True):
                for doc, (text, digest, sig, counts, rejected, language) in zip(chunk, result, strict=True):
                    verdicts.append(rejected)
                    if language:
                        languages[language] += 1
                    stats["read"]["docs"] += 1
                    stats["read"]["bytes"] += len(doc.text.encode())
                    stats["normalize"]["bytes_out"] += len(text.encode())
                    pii_counts.update(counts)
                    digests.append(digest)
                    if sig is not None:
                        signatures.append(sig)
                    f.write(json.dumps({"id": doc.id, "source": doc.source, "text": text,
                                        "row": len(digests) - 1}, ensure_ascii=False) + "\n")
    seconds["read+normalize+minhash"] = time.perf_counter() - tic
    n = len(digests)
    if n == 0:
        raise ValueError(f"no usable documents in {cfg.inputs}: {dict(bad.counts)} (see the report's examples)")

    tic = time.perf_counter()
    if cfg.filters.enabled and cfg.filters.engine == "curator":
        verdicts, languages = _curator_verdicts(cfg, spill, tmp, n)
        seconds["filters (curator)"] = time.perf_counter() - tic
    removed_by = Counter(v for v in verdicts if v is not None)
    keep = np.array([v is None for v in verdicts], dtype=bool)
    stats["filters"] = Counter(docs_in=n, removed=int(n - keep.sum()))

    fuzzy_sizes = Counter()
    if _on_gpu(cfg):
        tic = time.perf_counter()
        survivors = _gpu_dedup(cfg, spill, tmp, keep)
        alive = int(keep.sum())
        keep &= np.isin(np.arange(n), list(survivors))
        stats["gpu_dedup"] = Counter(docs_in=alive, removed=int(alive - keep.sum()))
        seconds["dedup (gpu)"] = time.perf_counter() - tic
    else:
        tic = time.perf_counter()
        exact_clusters = _exact(digests, keep) if cfg.exact_dedup else Counter()
        stats["exact_dedup"].update(docs_in=int(stats["filters"]["docs_in"] - stats["filters"]["removed"]),
                                    removed=sum(exact_clusters.values()), clusters=len(exact_clusters))
        seconds["exact_dedup"] = time.perf_counter() - tic
        tic = time.perf_counter()
        alive = np.flatnonzero(keep)
        if cfg.fuzzy_dedup and len(alive):
            roots = dedup.fuzzy_clusters(np.stack([signatures[i] for i in alive]), cfg.jaccard_threshold)
            members = Counter(roots.tolist())
            fuzzy_sizes = Counter(size for size in members.values() if size > 1)
            keep[alive[roots != np.arange(len(alive))]] = False
            stats["fuzzy_dedup"].update(docs_in=len(alive), removed=int(len(alive) - keep.sum()),
                                        clusters=sum(fuzzy_sizes.values()))
        seconds["fuzzy_dedup"] = time.perf_counter() - tic

    tic = time.perf_counter()
    shards = write_shards(tmp, _kept(spill, keep), int(cfg.shard_mb * 2**20), cfg.output_format)
    spill.unlink()
    seconds["write"] = time.perf_counter() - tic
    report = build_report(cfg, stats, seconds, bad, pii_counts, fuzzy_sizes, removed_by, languages,
                          int(keep.sum()), shards, started)
    report["engine"] = {"name": "local", "workers": cfg.workers}
    return report


def _exact(digests: list[bytes], keep: np.ndarray) -> Counter:
    """Drop every later copy of a content digest; returns {first row: copies removed}."""
    first: dict[bytes, int] = {}
    clusters: Counter = Counter()
    for i, digest in enumerate(digests):
        if not keep[i]:
            continue
        if digest in first:
            keep[i] = False
            clusters[first[digest]] += 1
        else:
            first[digest] = i
    return clusters


def _on_gpu(cfg: CurateConfig) -> bool:
    from kiln.curation.gpu import cudf_available

    return (cfg.exact_dedup or cfg.fuzzy_dedup) and cfg.dedup_backend != "cpu" and cudf_available()


def _gpu_dedup(cfg: CurateConfig, spill: Path, tmp: Path, keep: np.ndarray) -> set[int]:
    """Curator's cuDF workflows over the documents the filters kept."""
    from kiln.curation.gpu import surviving_rows

    work = tmp / ".gpu"
    work.mkdir()
    kept = work / "input.jsonl"
    with open(spill, encoding="utf-8") as src, open(kept, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if keep[i]:
                dst.write(line)
    rows = surviving_rows(cfg, kept, work)
    shutil.rmtree(work)
    return rows


def _curator_verdicts(cfg: CurateConfig, spill: Path, tmp: Path, n: int) -> tuple[list, Counter]:
    """Score the spilled documents with Curator's pipeline, then judge them from the scores."""
    from kiln.curation.filters import SCORE_PREFIX, Screener, score_with_curator

    scored_dir = tmp / ".curator"
    score_with_curator(cfg.filters, [str(spill)], scored_dir, num_cpus=cfg.workers)
    screener = Screener(cfg.filters)
    verdicts: list = [None] * n
    languages = Counter()
    for path in sorted(scored_dir.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            scores = {k[len(SCORE_PREFIX):]: v for k, v in record.items() if k.startswith(SCORE_PREFIX)}
            verdicts[record["row"]], language = screener.verdict(scores)
            if language:
                languages[language] += 1
    shutil.rmtree(scored_dir)
    return verdicts, languages


def _kept(spill: Path, keep: np.ndarray):
    with open(spill, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if keep[i]:
                record = json.loads(line)
                yield Document(record["id"], record["source"], record["text"])
