"""Pipelines: which stages of a recipe run, what each reads from the one before, and which are fresh.

A pipeline recipe gives one config per stage (in the registry's order) and `links`: which stage
output feeds which input field (`"sft.checkpoint.load_weights": "pretrain.checkpoints"`, or a list
of candidates, the first present stage wins). Links are resolved after every override, so a
stage always reads its upstream stage's resolved artifact; overriding a linked field is refused.
A stage is fresh, and skipped, when its artifact's kiln.json records the same requested config
and every input it recorded still has the same content digest, and no stage before it runs again.
Launching is kiln.launch's (`kiln.launch.driver.launch_pipeline`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from kiln import overrides
from kiln.artifact import digest, read_manifest
from kiln.errors import ConfigError
from kiln.stages import STAGES, PipelineConfig


def _sources(link) -> list[str]:
    return [link] if isinstance(link, str) else list(link)


def upstream_of(pipeline: PipelineConfig, target: str) -> tuple[str, str] | None:
    """(stage, output) feeding `target` ("stage.field.path"), or None when no linked stage is present."""
    for source in _sources(pipeline.links.get(target, [])):
        stage, output = source.split(".", 1)
        if getattr(pipeline, stage, None) is not None:
            return stage, output
    return None


def resolve_links(pipeline: PipelineConfig) -> PipelineConfig:
    """A copy with every linked input field set from its upstream stage's output."""
    resolved = copy.deepcopy(pipeline)
    for target in pipeline.links:
        stage_name, field_path = target.split(".", 1)
        cfg = getattr(resolved, stage_name, None)
        source = upstream_of(resolved, target)
        if cfg is None or source is None:
            continue  # the stage, or every stage that could feed it, is left out: the field stays as set
        value = STAGES[source[0]].output(getattr(resolved, source[0]), source[1])
        current = overrides.get_path(cfg, field_path)
        overrides.set_path(cfg, field_path, [value] if isinstance(current, list) else value)
    return resolved


def with_overrides(pipeline: PipelineConfig, items: list[str]) -> PipelineConfig:
    """Apply `stage.field=value` overrides; a linked field cannot be overridden while its upstream
    stage is part of the pipeline (it would read another artifact than the one its upstream writes)."""
    pipeline = copy.deepcopy(pipeline)
    for item in items:
        path = item.split("=", 1)[0].strip()
        for target in pipeline.links:
            source = upstream_of(pipeline, target)
            if source and (path == target or target.startswith(path + ".")):
                raise ConfigError(
                    f"{path} comes from the {source[0]} stage's output ({'.'.join(source)}), so the two always "
                    f"agree: change the {source[0]} stage's own fields (e.g. {source[0]}.run_dir), or run "
                    f"`kiln {target.split('.')[0]}` on its own to point it elsewhere"
                )
    overrides.apply(pipeline, items)
    return pipeline


@dataclass
class StagePlan:
    name: str
    cfg: object
    artifact: Path
    status: str  # fresh | missing | config changed | input changed: <path> | upstream reruns

    @property
    def runs(self) -> bool:
        return self.status != "fresh"


def _comparable(config: dict) -> dict:
    """A config as freshness compares it: without checkpoint.resume, which the launcher sets for
    Slurm jobs (a policy of where it runs, not a change to what it computes), nor the experiment
    trackers (turning W&B on must not retrain a fresh stage; manifests from before they existed match)."""
    config = copy.deepcopy(config)
    if isinstance(config.get("checkpoint"), dict):
        config["checkpoint"].pop("resume", None)
    if isinstance(config.get("logging"), dict):
        for tracker in ("wandb", "mlflow"):
            config["logging"].pop(tracker, None)
    return config


def freshness(name: str, cfg, digests: bool = True) -> str:
    """fresh, missing, config changed, or input changed; without `digests` the inputs are not hashed
    again (a status that refreshes every few seconds cannot re-read every corpus and checkpoint)."""
    manifest = read_manifest(STAGES[name].artifact_dir(cfg))
    if manifest is None:
        return "missing"
    if _comparable(manifest.get("request", manifest["config"])) != _comparable(overrides.to_dict(cfg)):
        return "config changed"
    for record in manifest["inputs"] if digests else []:
        path = Path(record["path"])
        if not path.exists() or digest(path) != record["digest"]:
            return f"input changed: {path}"
    return "fresh"


def plan(pipeline: PipelineConfig, digests: bool = True) -> list[StagePlan]:
    plans, upstream_runs = [], False
    for name, cfg in resolve_links(pipeline).stages():
        status = "upstream reruns" if upstream_runs else freshness(name, cfg, digests)
        plans.append(StagePlan(name, cfg, Path(STAGES[name].artifact_dir(cfg)), status))
        upstream_runs = upstream_runs or status != "fresh"
    return plans


def summary_line(name: str, manifest_or_summary: dict | None) -> str:
    """The key figures of a finished stage (from its manifest, or the summary its entry returned)."""
    if not manifest_or_summary:
        return ""
    s = manifest_or_summary.get("summary", manifest_or_summary)
    if name == "prepare":
        aside = f" (+{s['heldout']['documents']} held out)" if s.get("heldout") else ""
        return f"{s.get('documents')} documents{aside}, {s.get('tokens')} tokens"
    if name == "curate":
        return f"{s.get('documents_in')} -> {s.get('documents_out')} documents"
    if "final" in s:  # a training stage: its last step's reports
        shown = ("loss", "val_loss", "accuracy", "val_accuracy", "reward")
        figures = [f"{k} {v:.4f}" for k, v in s["final"].items() if k in shown and v is not None]
        return ", ".join([f"{s.get('steps')} steps", *figures])
    if name == "eval":  # each task's headline: bits per byte, accuracy or exact match when it has one
        headline = ("bits_per_byte", "acc", "exact_match")
        return ", ".join(f"{task.removeprefix('kiln_')} {metric} {m['value']:.4f}"
                         for task, figures in s.get("metrics", {}).items()
                         for metric, m in figures.items() if metric in headline or len(figures) == 1)
    if name in ("convert", "export") and s.get("max_abs_logit_delta") is not None:
        return f"verified, max |delta logit| {s['max_abs_logit_delta']:.1e}"
    return ", ".join(f"{k} {v}" for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def in_progress(name: str, artifact: Path, cfg=None) -> str | None:
    """What the files say about a stage without a manifest yet: a training run's last logged step,
    or a data stage's half-written `<dir>.tmp-*`. Files only: a run that was killed reads the same."""
    metrics = artifact / "metrics.jsonl"
    if STAGES[name].artifact == "run_dir" and metrics.exists():
        step = 0
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "loss" in record:
                step = record["step"]
        total = getattr(getattr(cfg, "train", None), "steps", None)
        return f"in progress: step {step}" + (f"/{total}" if total else "")
    if artifact.parent.is_dir() and any(artifact.parent.glob(f"{artifact.name}.tmp-*")):
        return "in progress"
    return None


def status_table(pipeline: PipelineConfig, digests: bool = True) -> str:
    rows = [("stage", "state", "artifact", "summary")]
    for p in plan(pipeline, digests):
        manifest = read_manifest(p.artifact)
        state = "done" if p.status == "fresh" else ("stale: " + p.status if manifest else
                                                    in_progress(p.name, p.artifact, p.cfg) or "not run")
        rows.append((p.name, state, str(p.artifact), summary_line(p.name, manifest)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def watch(pipeline: PipelineConfig, interval: float = 2.0, console=None) -> int:
    """`kiln pipeline status --watch`: the status table, redrawn every `interval` seconds until every
    stage is done, or Ctrl-C (which stops the watching, not the pipeline). On a terminal the table
    is redrawn in place; into a log or a pipe each new state is printed once. Inputs are compared by
    config only while watching (not re-hashed)."""
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = console or Console()

    def frames():
        while True:
            done = all(p.status == "fresh" for p in plan(pipeline, digests=False))
            yield done, status_table(pipeline, digests=False)
            if done:
                return
            time.sleep(interval)

    footer = f"\n(every {interval:g} s until every stage is done; Ctrl-C stops watching, not the pipeline)"
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False) as live:
                for done, table in frames():
                    live.update(Text(table + ("" if done else footer)), refresh=True)
        else:
            shown = None
            for _, table in frames():
                if table != shown:
                    console.print(Text(table))
                    shown = table
    except KeyboardInterrupt:
        pass
    return 0
