"""Deduplication on GPU with NeMo Curator's own workflows (cuDF), when cuDF is importable.

The same CurateConfig drives them: Curator's ExactDeduplicationWorkflow, then its
FuzzyDeduplicationWorkflow (MinHash over character n-grams, LSH with kiln's bands and rows
for the configured Jaccard threshold), each removing what it finds; kiln reads back which
rows survived. Curator's workflows import cuDF at import time, so this path was written
against Curator 1.4.0's signatures and is checked here only for that (no GPU ran it).
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.config import CurateConfig
from kiln.curation import dedup


def cudf_available() -> bool:
    try:
        import cudf  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def exact_kwargs(cfg: CurateConfig, inputs: list[str], output: Path) -> dict:
    return {"output_path": str(output), "input_path": inputs, "input_filetype": "jsonl", "text_field": "text",
            "assign_id": True, "perform_removal": True}


def fuzzy_kwargs(cfg: CurateConfig, inputs: list[str], cache: Path, output: Path) -> dict:
    bands, rows = dedup.lsh_params(cfg.jaccard_threshold, cfg.num_perm)
    return {"cache_path": str(cache), "output_path": str(output), "input_path": inputs, "input_filetype": "jsonl",
            "text_field": "text", "perform_removal": True, "char_ngrams": cfg.gpu_char_ngrams,
            "num_bands": bands, "minhashes_per_band": rows, "seed": 42}


def surviving_rows(cfg: CurateConfig, spill: Path, workdir: Path) -> set[int]:
    """Rows of `spill` (JSONL with `row` and `text`) that Curator's GPU dedup keeps."""
    from nemo_curator.stages.deduplication.exact.workflow import ExactDeduplicationWorkflow
    from nemo_curator.stages.deduplication.fuzzy.workflow import FuzzyDeduplicationWorkflow

    current = [str(spill)]
    if cfg.exact_dedup:
        ExactDeduplicationWorkflow(**exact_kwargs(cfg, current, workdir / "exact")).run()
        current = _outputs(workdir / "exact")
    if cfg.fuzzy_dedup:
        FuzzyDeduplicationWorkflow(**fuzzy_kwargs(cfg, current, workdir / "cache", workdir / "fuzzy")).run()
        current = _outputs(workdir / "fuzzy")
    rows: set[int] = set()
    for path in current:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows.update(pq.read_table(path, columns=["row"]).column("row").to_pylist())
        else:
            rows.update(json.loads(line)["row"] for line in Path(path).read_text().splitlines())
    return rows


def _outputs(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*") if p.suffix in (".jsonl", ".parquet"))
