"""curation_report.json and the table `kiln curate` prints."""

from __future__ import annotations

import time
from collections import Counter

from kiln.config import CurateConfig
from kiln.curation import dedup
from kiln.curation.io import BadInput


def build_report(cfg: CurateConfig, stats: dict, seconds: dict, bad: BadInput, pii_counts: Counter,
                 fuzzy_sizes: Counter, removed_by: Counter, languages: Counter, kept: int, shards: list[str],
                 started: float) -> dict:
    """curation_report.json: the same figures whichever engine ran (timings and `engine` aside)."""
    docs = stats["read"]["docs"]
    return {
        "inputs": list(cfg.inputs),
        "documents_in": docs + sum(bad.counts.values()),
        "documents_out": kept,
        "bytes_in": stats["read"]["bytes"],
        "bytes_after_normalize": stats["normalize"]["bytes_out"],
        "bad_input": {"counts": dict(bad.counts), "examples": bad.examples},
        "exact_dedup": dict(stats["exact_dedup"]),
        "gpu_dedup": dict(stats["gpu_dedup"]) or None,
        "fuzzy_dedup": {**dict(stats["fuzzy_dedup"]),
                        "cluster_sizes": {str(k): v for k, v in sorted(fuzzy_sizes.items())},
                        "jaccard_threshold": cfg.jaccard_threshold,
                        "bands_rows": list(dedup.lsh_params(cfg.jaccard_threshold, cfg.num_perm))},
        "pii": dict(pii_counts) if cfg.pii else None,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "docs_per_second": {k: round(docs / v, 1) for k, v in seconds.items() if v > 0},
        "shards": shards,
        "wall_seconds": round(time.time() - started, 3),
        "filters": {**dict(stats["filters"]), "removed_by": dict(removed_by.most_common()),
                    "engine": cfg.filters.engine} if cfg.filters.enabled else None,
        "languages": dict(languages.most_common()),
    }


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kiln curate")
    for column in ("stage", "documents", "removed", "detail"):
        table.add_column(column)
    bad = sum(report["bad_input"]["counts"].values())
    table.add_row("read", str(report["documents_in"]), str(bad), ", ".join(
        f"{k} {v}" for k, v in report["bad_input"]["counts"].items()) or "no bad input")
    if report["filters"]:
        f = report["filters"]
        table.add_row("filters", str(f["docs_in"]), str(f["removed"]),
                      ", ".join(f"{k} {v}" for k, v in list(f["removed_by"].items())[:4]) or "none removed")
    for stage in ("exact_dedup", "fuzzy_dedup", "gpu_dedup"):
        s = report[stage]
        if s:
            table.add_row(stage, str(s.get("docs_in", 0)), str(s.get("removed", 0)), f"{s.get('clusters', 0)} clusters")
    if report["pii"] is not None:
        table.add_row("pii", "", "", ", ".join(f"{k} {v}" for k, v in report["pii"].items()) or "none found")
    table.add_row("write", str(report["documents_out"]), "", f"{len(report['shards'])} shard(s)")
    Console().print(table)
