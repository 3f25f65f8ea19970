"""Deduplication on GPU with NeMo Curator's own workflows (cuDF), when they import.

Curator 1.4.0's workflows identify duplicates and write the ids to remove; they refuse to remove
anything themselves (`perform_removal=True` raises NotImplementedError) and never write documents.
So kiln runs them on a Ray cluster it starts (their `run()` needs one: an id-generator actor and
Curator's RayActorPoolExecutor) and maps their ids back to its own rows:

1. exact: `ExactDeduplicationWorkflow(assign_id=False, id_field="row")` reads kiln's `row` column,
   so its `ExactDuplicateIds/*.parquet` name kiln rows directly;
2. the survivors are written to a second file, and `FuzzyDeduplicationWorkflow` (MinHash over
   character n-grams, LSH with kiln's bands and rows for the Jaccard threshold, connected
   components) numbers that file's lines 0..n-1 (one file: one id batch; checked against its
   id-generator record);
3. each duplicate group (`ConnectedComponentsStage`) keeps its first row, the rule of kiln's CPU
   path, instead of Curator's arbitrary pick, so both paths keep the same document of a group.
   Running both workflows on the original file and uniting their removals could drop every copy.

Every argument was checked against Curator 1.4.0's source; tests construct the real workflow
objects with the GPU modules stubbed. With PII redaction on, the GPU path compares redacted text
(the CPU path digests the text before redaction).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from kiln.config import CurateConfig
from kiln.curation import dedup

# the packages Curator's dedup workflows import at module load
GPU_MODULES = ("cudf", "cudf_streaming", "pylibcugraph", "pynvml", "rapidsmpf", "rmm")
ID = "_curator_dedup_id"


def cudf_available() -> bool:
    import importlib

    try:
        for name in GPU_MODULES:
            importlib.import_module(name)
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def exact_kwargs(cfg: CurateConfig, input_path: Path, output: Path) -> dict:
    return {"output_path": str(output), "input_path": [str(input_path)], "input_filetype": "jsonl",
            "text_field": "text", "assign_id": False, "id_field": "row", "perform_removal": False}


def fuzzy_kwargs(cfg: CurateConfig, input_path: Path, cache: Path, output: Path) -> dict:
    bands, rows = dedup.lsh_params(cfg.jaccard_threshold, cfg.num_perm)
    return {"cache_path": str(cache), "output_path": str(output), "input_path": [str(input_path)],
            "input_filetype": "jsonl", "text_field": "text", "perform_removal": False,
            "char_ngrams": cfg.gpu_char_ngrams, "num_bands": bands, "minhashes_per_band": rows,
            # Curator shuffles this many bands per pass and requires 1 <= it <= num_bands
            "bands_per_iteration": min(5, bands), "seed": 42}


def surviving_rows(cfg: CurateConfig, input_path: Path, work: Path) -> set[int]:
    """Rows of `input_path` (JSONL with `row` and `text`) that Curator's GPU dedup keeps."""
    from nemo_curator.stages.deduplication.exact.workflow import ExactDeduplicationWorkflow
    from nemo_curator.stages.deduplication.fuzzy.workflow import FuzzyDeduplicationWorkflow

    from kiln.ray.local import ray_cluster

    survivors = {json.loads(line)["row"] for line in input_path.open(encoding="utf-8")}
    with ray_cluster(num_cpus=cfg.workers):
        if cfg.exact_dedup:
            ExactDeduplicationWorkflow(**exact_kwargs(cfg, input_path, work / "exact")).run()
            survivors -= _column(work / "exact" / "ExactDuplicateIds", "row")
        if cfg.fuzzy_dedup:
            fuzzy_input, rows_in_file = _write_rows(input_path, survivors, work / "fuzzy_input.jsonl")
            FuzzyDeduplicationWorkflow(**fuzzy_kwargs(cfg, fuzzy_input, work / "cache", work / "fuzzy")).run()
            _check_ids(work / "fuzzy" / "fuzzy_id_generator.json", fuzzy_input, len(rows_in_file))
            survivors -= duplicates_after_first(work / "cache" / "ConnectedComponentsStage", rows_in_file)
    return survivors


def duplicates_after_first(components: Path, rows_in_file: list[int]) -> set[int]:
    """Every row of a duplicate group but its first (the CPU path's keeper)."""
    groups: dict[int, list[int]] = {}
    for ids, group in zip(_column_list(components, ID), _column_list(components, "_duplicate_group_id"),
                          strict=True):
        groups.setdefault(group, []).append(rows_in_file[ids])
    return {row for members in groups.values() for row in sorted(members)[1:]}


def _write_rows(source: Path, rows: set[int], target: Path) -> tuple[Path, list[int]]:
    kept = []
    with source.open(encoding="utf-8") as src, target.open("w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)["row"]
            if row in rows:
                dst.write(line)
                kept.append(row)
    return target, kept


def _check_ids(registry_file: Path, input_path: Path, n: int) -> None:
    """Curator numbers one input file's lines 0..n-1; anything else would map ids to wrong rows."""
    registry = json.loads(registry_file.read_text())["batch_registry"]
    key = str(uuid.uuid5(uuid.NAMESPACE_URL, str(input_path.resolve())))
    if registry != {key: [0, n - 1]}:
        raise RuntimeError(f"{registry_file}: Curator numbered the documents {registry}, not 0..{n - 1} for "
                           f"{input_path}; kiln cannot map its duplicate ids back to rows")


def _column(directory: Path, name: str) -> set[int]:
    return set(_column_list(directory, name))


def _column_list(directory: Path, name: str) -> list[int]:
    import pyarrow.parquet as pq

    values: list[int] = []
    for path in sorted(directory.glob("*.parquet")) if directory.is_dir() else []:
        values += pq.read_table(path, columns=[name]).column(name).to_pylist()
    return values
