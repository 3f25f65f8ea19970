"""`kiln pipeline`: the stages of a recipe as one NeMo-Run experiment, skipping fresh ones.

Stages run in the fixed order of ORDER, each reading the artifact directories of the stages
before it (the recipe wires the paths). A stage is fresh, and skipped, when its artifact's
kiln.json records the same requested config and every input it recorded still has the same
content digest, and no stage before it runs again.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from kiln import overrides
from kiln.artifact import digest, read_manifest
from kiln.config import (
    ConvertConfig,
    CurateConfig,
    DPOConfig,
    ExportConfig,
    PrepareConfig,
    PretrainConfig,
    RLHFConfig,
    RMConfig,
    SFTConfig,
)
from kiln.launch import submit
from kiln.launch.config import LaunchConfig
from kiln.stages import STAGES

ORDER = ("curate", "prepare", "pretrain", "sft", "dpo", "rm", "rlhf", "convert", "export")


@dataclass
class PipelineConfig:
    """One optional config per stage; the recipe points each stage at its predecessors' outputs."""

    name: str = "pipeline"
    curate: CurateConfig | None = None
    prepare: PrepareConfig | None = None
    pretrain: PretrainConfig | None = None
    sft: SFTConfig | None = None
    dpo: DPOConfig | None = None
    rm: RMConfig | None = None
    rlhf: RLHFConfig | None = None
    convert: ConvertConfig | None = None
    export: ExportConfig | None = None

    def stages(self) -> list[tuple[str, object]]:
        return [(name, getattr(self, name)) for name in ORDER if getattr(self, name) is not None]


@dataclass
class StagePlan:
    name: str
    cfg: object
    artifact: Path
    status: str  # fresh | missing | config changed | input changed: <path> | upstream reruns
    nproc: int

    @property
    def runs(self) -> bool:
        return self.status != "fresh"


def _nproc(name: str, cfg) -> int:
    if not STAGES[name].distributed:
        return 1
    return cfg.parallel.world_size or cfg.parallel.tp * cfg.parallel.pp


def freshness(name: str, cfg) -> str:
    manifest = read_manifest(STAGES[name].artifact_dir(cfg))
    if manifest is None:
        return "missing"
    if manifest.get("request", manifest["config"]) != overrides.to_dict(cfg):
        return "config changed"
    for record in manifest["inputs"]:
        path = Path(record["path"])
        if not path.exists() or digest(path) != record["digest"]:
            return f"input changed: {path}"
    return "fresh"


def plan(pipeline: PipelineConfig) -> list[StagePlan]:
    plans, upstream_runs = [], False
    for name, cfg in pipeline.stages():
        status = "upstream reruns" if upstream_runs else freshness(name, cfg)
        plans.append(StagePlan(name, cfg, Path(STAGES[name].artifact_dir(cfg)), status, _nproc(name, cfg)))
        upstream_runs = upstream_runs or status != "fresh"
    return plans


def summary_line(name: str, manifest: dict | None) -> str:
    """The key figures of a finished stage."""
    if not manifest:
        return ""
    s = manifest.get("summary", {})
    if name == "prepare":
        return f"{s.get('documents')} documents, {s.get('tokens')} tokens"
    if name == "curate":
        return f"{s.get('documents_in')} -> {s.get('documents_out')} documents"
    if "final" in s:  # a training stage: its last step's reports
        shown = ("loss", "val_loss", "accuracy", "val_accuracy", "reward")
        figures = [f"{k} {v:.4f}" for k, v in s["final"].items() if k in shown and v is not None]
        return ", ".join([f"{s.get('steps')} steps", *figures])
    if name in ("convert", "export") and s.get("max_abs_logit_delta") is not None:
        return f"verified, max |delta logit| {s['max_abs_logit_delta']:.1e}"
    return ", ".join(f"{k} {v}" for k, v in s.items() if isinstance(v, (int, float)))


def status_table(pipeline: PipelineConfig) -> str:
    rows = [("stage", "state", "artifact", "summary")]
    for p in plan(pipeline):
        manifest = read_manifest(p.artifact)
        state = "done" if p.status == "fresh" else ("stale: " + p.status if manifest else "not run")
        rows.append((p.name, state, str(p.artifact), summary_line(p.name, manifest)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def run(pipeline: PipelineConfig, launch: LaunchConfig, dryrun: bool = False, detach: bool = False,
        echo=print) -> int:
    """Validate, then submit every stage that is not fresh, each after the one before it."""
    tasks, previous = [], None
    for p in plan(pipeline):
        echo(f"{p.name:<10} {'run' if p.runs else 'skip'} ({p.status})")
        if not p.runs:
            continue
        check = copy.deepcopy(p.cfg)
        if getattr(getattr(check, "model", None), "vocab_size", 0) is None:
            check.model.vocab_size = 1  # the tokenizer comes from an earlier stage of this run
        STAGES[p.name].validate(check, p.nproc)
        if launch.executor == "slurm" and hasattr(p.cfg, "checkpoint"):
            p.cfg.checkpoint.resume = True  # a requeued job continues
        tasks.append(submit.Task(p.name, p.cfg, p.nproc, after=[previous] if previous else []))
        previous = p.name
    if not tasks:
        echo("every stage is fresh: nothing to run")
        return 0
    title = f"kiln-pipeline-{pipeline.name}"
    if dryrun:
        echo(submit.render(title, tasks, launch))
        return 0
    for task in tasks:  # a stale artifact is moved aside, so the rerun starts clean
        _set_aside(Path(STAGES[task.name].artifact_dir(task.cfg)))
    if launch.executor == "slurm":  # one submission: Slurm's afterok chains the stages
        result = submit.submit(title, tasks, launch, detach=detach)
        if detach:
            echo(f"submitted experiment {result.experiment_id} ({result.experiment_dir})")
            return 0
        ok = result.ok
    else:  # NeMo-Run runs local and Docker DAGs level by level but ignores failures: go one by one
        ok = True
        for task in tasks:
            result = submit.submit(f"{title}-{task.name}", [dataclasses.replace(task, after=[])], launch)
            if not result.ok:
                echo(f"{task.name} failed ({result.states}); the stages after it were not started")
                ok = False
                break
    echo(status_table(pipeline))
    return 0 if ok else 1


def _set_aside(artifact: Path) -> None:
    if artifact.exists():
        artifact.rename(artifact.with_name(f"{artifact.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))


def with_overrides(pipeline: PipelineConfig, items: list[str]) -> PipelineConfig:
    pipeline = dataclasses.replace(pipeline)
    overrides.apply(pipeline, items)
    return pipeline
