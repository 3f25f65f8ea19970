"""What a report shows, read from what the stages left on disk: manifests (kiln.json), training
metrics (metrics.jsonl), curation_report.json, the indexed datasets' headers and eval_summary.json.
Nothing here draws; a malformed or missing record is a ReportError naming the file and the fix."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kiln import pipeline as pl
from kiln.artifact import MANIFEST, read_manifest
from kiln.errors import ReportError
from kiln.stages import STAGES, PipelineConfig

METRICS = "metrics.jsonl"
# directories a pipeline root may hold beside its stages: moved-aside and half-written artifacts
_NOT_STAGES = (".stale-", ".tmp-")


def trains(stage: str) -> bool:
    """A stage that runs the training loop, and so writes metrics.jsonl into its run_dir."""
    return stage in STAGES and STAGES[stage].artifact == "run_dir"


@dataclass
class StageRecord:
    name: str  # the registry's stage name
    path: Path  # its artifact directory
    manifest: dict | None
    state: str  # done | stale: <why> | not run | in progress
    metrics: list[dict] = field(default_factory=list)  # one record per step, the last one written wins

    @property
    def seconds(self) -> float | None:
        m = self.manifest
        if not m or not m.get("started") or not m.get("ended"):
            return None
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        return (datetime.strptime(m["ended"], fmt) - datetime.strptime(m["started"], fmt)).total_seconds()


@dataclass
class Subject:
    title: str  # "pipeline tiny", or the directory reported
    stages: list[StageRecord]
    default_output: Path

    def first(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name and s.manifest), None)


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of `run_dir`/metrics.jsonl by step; a resumed run's records replace the ones it re-ran."""
    path = run_dir / METRICS
    if not path.exists():
        raise ReportError(f"{run_dir} has no {METRICS}: a training stage writes it (rank 0) from its first step; "
                          f"give a training run's run_dir, or a pipeline whose training stages have started")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as exc:
            raise ReportError(f"{path}:{n}: not a metrics record ({exc}); each line is a JSON object with a "
                              f"`step`: remove the line (a killed run can leave a partial last line)") from None
    return [by_step[s] for s in sorted(by_step)]


def _record(name: str, path: Path, state: str) -> StageRecord:
    manifest = read_manifest(path)
    record = StageRecord(name, path, manifest, state)
    if trains(name) and (manifest or (path / METRICS).exists()):
        record.metrics = read_metrics(path)
    return record


def from_pipeline(pipeline: PipelineConfig, partial: bool = False) -> Subject:
    """Every stage of `pipeline`, in order. A stage that has not run is an error naming it and its
    directory, unless `partial` (then it is shown as not run); no stage at all is always one."""
    records, missing = [], []
    for p in pl.plan(pipeline):
        manifest = read_manifest(p.artifact)
        if manifest is None:
            progress = pl.in_progress(p.name, p.artifact, p.cfg)
            missing.append(p)
            records.append(_record(p.name, p.artifact, progress or "not run"))
        else:
            records.append(_record(p.name, p.artifact, "done" if p.status == "fresh" else f"stale: {p.status}"))
    if len(missing) == len(records):
        raise ReportError(f"no stage of pipeline {pipeline.name} has run: {records[0].path} and the other stages' "
                          f"directories hold no {MANIFEST}; run `kiln pipeline run {pipeline.name}` first")
    if missing and not partial:
        raise ReportError("; ".join(f"stage {p.name} has not run ({p.artifact} holds no {MANIFEST})" for p in missing)
                          + f": run `kiln pipeline run {pipeline.name}` (or `kiln {missing[0].name}`), or report "
                          f"the stages that exist with --partial")
    root = Path(os.path.commonpath([str(r.path.resolve()) for r in records]))
    if any(root == r.path.resolve() for r in records):  # a pipeline of one stage: beside it, not inside it
        root = root.parent
    return Subject(f"pipeline {pipeline.name}", records, root / "report")


def from_path(path: Path) -> Subject:
    """One stage's directory (a kiln.json, or a training run's metrics.jsonl so far), or a pipeline's
    root: the stage directories right under it."""
    if not path.exists():
        raise ReportError(f"{path} does not exist: give a stage's directory (with {MANIFEST}), a pipeline's root "
                          f"directory (e.g. runs/demo) or a pipeline recipe name (e.g. tiny)")
    if not path.is_dir():
        raise ReportError(f"{path} is a file: give a stage's directory (with {MANIFEST}) or a pipeline's root "
                          f"directory")
    beside = path.resolve().parent / f"{path.resolve().name}-report"
    manifest = read_manifest(path)
    if manifest is not None:  # (a training stage's directory without its metrics.jsonl is refused there)
        return Subject(str(path), [_record(manifest.get("stage", ""), path, "done")], beside)
    if (path / METRICS).exists():  # a training run still going (or stopped before its manifest)
        metrics = read_metrics(path)
        last = max((r["step"] for r in metrics if "loss" in r), default=0)
        name = path.name if trains(path.name) else "training"
        return Subject(str(path), [StageRecord(name, path, None, f"in progress: step {last}", metrics)], beside)
    found = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not any(s in p.name for s in _NOT_STAGES)):
        child_manifest = read_manifest(child)
        if child_manifest is not None:
            found.append(_record(child_manifest.get("stage", child.name), child, "done"))
    if not found:
        raise ReportError(f"{path} holds no kiln artifact: neither it nor a directory right under it has a "
                          f"{MANIFEST}; give a stage's output directory, a pipeline's root (e.g. runs/demo) or a "
                          f"pipeline recipe name (e.g. tiny), after the stages have run")
    order = list(STAGES)
    found.sort(key=lambda r: (order.index(r.name) if r.name in order else len(order), r.path.name))
    return Subject(str(path), found, path.resolve() / "report")


# ---- the figures' data ----


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def validation_keys(records: list[dict]) -> list[str]:
    """val_loss first, then each source's val_loss/<name>, in the order the run logged them."""
    keys = dict.fromkeys(k for r in records for k in r if k == "val_loss" or k.startswith("val_loss/"))
    return sorted(keys, key=lambda k: k != "val_loss")


@dataclass
class Source:
    name: str  # as in val_loss/<name> when the run logged those (blend order), else from the file name
    prefix: str
    documents: int
    tokens: int
    weight: float  # normalized blend weight
    trained: int | None  # tokens the stage drew from it: weight x steps x global batch x sequence length


def sources(subject: Subject) -> list[Source]:
    """Tokens per data source: each prefix of the first pretraining blend (else prepare's own
    output), counted from the indexed dataset's header and .bin size."""
    from kiln.data.indexed import read_counts

    training = next((s for s in subject.stages if s.manifest and "blend" in s.manifest["config"].get("data", {})
                     and not s.manifest["config"]["data"].get("mock")), None)
    if training is not None:
        cfg = training.manifest["config"]
        items = list(cfg["data"]["blend"])
        prefixes, weights = (items, [1.0]) if len(items) == 1 else (items[1::2], [float(w) for w in items[0::2]])
        steps = training.manifest["summary"].get("steps")
        per_step = cfg["train"]["global_batch_size"] * cfg["train"]["seq_length"]
        names = [k.split("/", 1)[1] for k in validation_keys(training.metrics) if "/" in k]
    else:
        prepare = subject.first("prepare")
        if prepare is None:
            return []
        summary = prepare.manifest["summary"]
        prefixes = summary.get("prefixes") or [summary["prefix"]]
        weights, steps, per_step, names = [1.0] * len(prefixes), None, 0, []
    if len(names) != len(prefixes):  # no per-source validation logged: name them by their files
        names = [f"{Path(p).name.removesuffix('_text_document')}" + (f" ({n + 1})" if len(prefixes) > 1 else "")
                 for n, p in enumerate(prefixes)]
    found = []
    for name, prefix, weight in zip(names, prefixes, weights, strict=True):
        if not (Path(f"{prefix}.idx").exists() and Path(f"{prefix}.bin").exists()):
            continue  # moved or deleted since: the stage table still names it
        counts = read_counts(prefix)
        share = weight / sum(weights)
        found.append(Source(name, str(prefix), counts["documents"], counts["tokens"], share,
                            round(share * steps * per_step) if steps else None))
    return found


def eval_comparison(subject: Subject, baseline: Path | None) -> dict | None:
    """The eval stage's summary with its checks against a baseline (`gate`): the ones the stage's own
    gate recorded, or, given `baseline` (an earlier eval_summary.json), kiln.evaluation.gate's
    comparison with it at the stage's tolerance."""
    from kiln.evaluation import gate

    record = subject.first("eval")
    if record is None:
        if baseline is not None:
            raise ReportError(f"--baseline {baseline} compares eval scores, but {subject.title} has no eval stage: "
                              f"report a pipeline or an eval directory, or leave --baseline out")
        return None
    summary_path = record.path / "eval_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else record.manifest["summary"]
    if baseline is not None:
        if not baseline.is_file():
            raise ReportError(f"--baseline {baseline} does not exist: give an earlier eval_summary.json")
        try:
            earlier = json.loads(baseline.read_text())
        except ValueError as exc:
            raise ReportError(f"--baseline {baseline} is not JSON ({exc}): give an earlier eval_summary.json") from None
        tolerance = record.manifest["config"].get("tolerance") or 0.0
        summary = {**summary, "gate": gate.compare(summary, earlier, tolerance, str(baseline))}
    return summary
