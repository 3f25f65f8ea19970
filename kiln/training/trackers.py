"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (`pip install 'kiln[track]'`).

They are sinks of the per-step record that metrics.jsonl gets (MetricsLogger feeds them on rank 0),
so whatever a stage adds to that record reaches them too. Besides the steps they get the resolved
config when a tracker run starts, the manifest's lineage once kiln.json is written, and later the
summary of each `kiln eval` of the run's checkpoints.

A tracker run's identity lives in `<run_dir>/trackers.json`: a resumed run (`--resume`, a requeued
Slurm job) continues the same W&B run id and MLflow run, a new run in an old directory starts new
ones, as metrics.jsonl is continued or started afresh. That file holds ids and destinations only:
the W&B key reaches the job as the secret WANDB_API_KEY (launch.secrets) and kiln never writes it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from kiln.artifact import CHECKPOINTS, MANIFEST, atomic_write_text
from kiln.config import LoggingConfig, MLflowConfig, WandbConfig
from kiln.validation import Problems

STATE = "trackers.json"
INSTALL = "pip install 'kiln[track]'"
TRACKERS = ("wandb", "mlflow")  # LoggingConfig's sections, named as the packages they need


def rules(cfg: LoggingConfig, problems: Problems, prefix: str = "logging") -> None:
    """A tracker asked for must be importable where the config is checked (the submitting shell and
    every rank); online W&B needs its key."""
    for name in TRACKERS:
        if getattr(cfg, name) is not None and not _installed(name):
            problems.add(f"{prefix}.{name} is set but the {name} package is not installed: {INSTALL} "
                         f"(or set {prefix}.{name}=null)")
    if cfg.wandb is not None and cfg.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        problems.add(f"{prefix}.wandb.mode=online but WANDB_API_KEY is not set: export it in the shell that "
                     f"launches (it travels as a secret, by name: launch.secrets), or set {prefix}.wandb.mode=auto")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules[module] is None: imports of it fail
        return False


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record under "/"-joined keys, as TensorBoard gets them: a dict (per layer) or a
    list (tokens per expert) becomes one series per entry; None, flags and text are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            out.update(flatten({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class WandbRun:
    def __init__(self, cfg: WandbConfig, run_dir: str, run_id: str, resume: bool, config: dict | None,
                 announce: bool = True):
        import wandb

        directory = Path(cfg.dir or run_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).resolve().name,
            tags=list(cfg.tags) or None, id=run_id, resume="allow" if resume else "never", mode=wandb_mode(cfg),
            dir=str(directory), config=None if resume else config,
            # stdout stays kiln's: no console capture; where the run's files are is said once, not on reopens
            settings=wandb.Settings(console="off", quiet=True, silent=not announce))
        if resume and config is not None:
            self.run.config.update(config, allow_val_change=True)
        # kiln's step is the x axis; wandb's own counter would drop a step logged twice (a resume
        # from an earlier checkpoint repeats steps, as metrics.jsonl does)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def attach(self, path: Path, extra: dict) -> None:
        self.run.config.update(extra, allow_val_change=True)
        # a copy in the run's own files: wandb.save links a file from elsewhere, and kiln.json changes
        # when the run is resumed
        copy = Path(self.run.dir) / path.name
        shutil.copyfile(path, copy)
        self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def close(self) -> None:
        self.run.finish()


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def local_mlflow_uri(run_dir: str) -> str:
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow" / "mlflow.db")


class MLflowRun:
    def __init__(self, cfg: MLflowConfig, run_dir: str, run_id: str | None, config: dict | None):
        from mlflow.tracking import MlflowClient

        self.uri = cfg.tracking_uri or local_mlflow_uri(run_dir)
        if cfg.tracking_uri is None:
            (Path(run_dir) / "mlflow").mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # the local store keeps its artifacts beside it, not in the working directory
            location = None if cfg.tracking_uri else (Path(run_dir).resolve() / "mlflow" / "artifacts").as_uri()
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or Path(run_dir).resolve().name,
                                     tags={str(k): str(v) for k, v in cfg.tags.items()})
        self.run_id = run.info.run_id
        if config is not None:
            from mlflow.entities import Param

            # MLflow refuses a param longer than 6000 characters (a long blend): config.json has it whole
            params = [Param(k, (json.dumps(v) if not isinstance(v, str) else v)[:6000])
                      for k, v in _dotted(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in values.items()])

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)  # MLflow has no run summary: the figures at the run's last step

    def attach(self, path: Path, extra: dict) -> None:
        self.client.log_artifact(self.run_id, str(path))
        for key, value in _dotted(extra).items():
            self.client.set_tag(self.run_id, key, json.dumps(value) if not isinstance(value, str) else value)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^\w./\- :]", "_", key)  # the characters MLflow accepts in a metric name


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_state(run_dir: str) -> dict:
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def open_run(cfg, resumed: bool) -> list:
    """The trackers `cfg.logging` asks for, on a new tracker run, or on the recorded one when
    `resumed` and it went to the same destination. Rank 0 only."""
    lg: LoggingConfig = cfg.logging
    if lg.wandb is None and lg.mlflow is None:
        if not resumed:  # a new run here has no tracker runs: eval must not log into an old one's
            (Path(cfg.run_dir) / STATE).unlink(missing_ok=True)
        return []
    state = _read_state(cfg.run_dir) if resumed else {}
    config = dataclasses.asdict(cfg)
    runs, new_state = [], {}
    if lg.wandb is not None:
        where = {"project": lg.wandb.project, "entity": lg.wandb.entity,
                 "dir": str(Path(lg.wandb.dir or cfg.run_dir).resolve()), "mode": lg.wandb.mode}
        old = state.get("wandb", {})
        same = bool(old) and all(old.get(k) == v for k, v in where.items())
        run_id = old["id"] if same else uuid.uuid4().hex[:16]
        runs.append(WandbRun(lg.wandb, cfg.run_dir, run_id, same, config))
        new_state["wandb"] = {"id": run_id, **where}
    if lg.mlflow is not None:
        where = {"tracking_uri": lg.mlflow.tracking_uri or local_mlflow_uri(cfg.run_dir),
                 "experiment": lg.mlflow.experiment}
        old = state.get("mlflow", {})
        same = bool(old) and all(old.get(k) == v for k, v in where.items())
        run = MLflowRun(lg.mlflow, cfg.run_dir, old["run_id"] if same else None, config)
        runs.append(run)
        new_state["mlflow"] = {"run_id": run.run_id, **where}
    atomic_write_text(Path(cfg.run_dir) / STATE, json.dumps(new_state, indent=2) + "\n")
    return runs


def reopen(run_dir: str | Path) -> list:
    """The tracker runs recorded in `run_dir`, continued (for its manifest or an eval of it)."""
    state = _read_state(str(run_dir))
    runs = []
    if "wandb" in state and _installed("wandb"):
        w = state["wandb"]
        cfg = WandbConfig(project=w["project"], entity=w["entity"], mode=w["mode"], dir=w["dir"])
        runs.append(WandbRun(cfg, str(run_dir), w["id"], True, None, announce=False))
    if "mlflow" in state and _installed("mlflow"):
        m = state["mlflow"]
        runs.append(MLflowRun(MLflowConfig(tracking_uri=m["tracking_uri"]), str(run_dir), m["run_id"], None))
    missing = [name for name in TRACKERS if name in state and not _installed(name)]
    if missing:
        print(f"note: {run_dir} records {', '.join(missing)} tracker runs but the packages are not installed "
              f"here: not logged there ({INSTALL})", flush=True)
    return runs


def log_manifest(cfg) -> None:
    """The run's kiln.json (its lineage: stage, kiln version, inputs with digests) and summary,
    into the tracker runs this run logged to."""
    run_dir = cfg.run_dir
    path = Path(run_dir) / MANIFEST
    if (cfg.logging.wandb is None and cfg.logging.mlflow is None) or not path.exists():
        return
    manifest = json.loads(path.read_text())
    lineage = {"stage": manifest["stage"], "kiln_version": manifest["kiln_version"],
               "inputs": {Path(i["path"]).name: i for i in manifest["inputs"]},
               "started": manifest["started"], "ended": manifest["ended"]}
    summary = flatten({k: v for k, v in manifest["summary"].items() if k != "checkpoint"}, "summary/")

    def post(run):
        run.attach(path, {"lineage": lineage})
        run.summary(manifest["summary"].get("steps") or 0, summary)

    _post(run_dir, post, "the manifest")


def _post(run_dir: str | Path, action, what: str) -> None:
    """`action` on each recorded tracker run of `run_dir`, after the stage's artifact is complete: a
    tracker that fails then (W&B unreachable) is reported, and the stage's result stands."""
    try:
        runs = reopen(run_dir)
    except Exception as exc:  # any tracker error: the artifact is written already
        print(f"warning: could not log {what} to the experiment trackers of {run_dir}: {exc}", flush=True)
        return
    for run in runs:
        try:
            action(run)
        except Exception as exc:
            print(f"warning: could not log {what} to {type(run).__name__} of {run_dir}: {exc}", flush=True)
        finally:
            run.close()


def find_run(path: str | Path, depth: int = 8) -> Path | None:
    """The training run directory behind an artifact: `path` itself, the run holding a checkpoint,
    or, through each kiln.json's inputs, the run an exported or converted model came from."""
    seen: set[Path] = set()
    todo = [Path(path).resolve()]
    while todo and depth > 0:
        depth -= 1
        here = todo.pop(0)
        # a run directory, its checkpoints/ or one checkpoint in it
        owner = here.parent if here.name == CHECKPOINTS else here.parent.parent if here.parent.name == CHECKPOINTS \
            else here
        if (owner / STATE).is_file():
            return owner
        if here in seen or not (here / MANIFEST).is_file():
            continue
        seen.add(here)
        todo += [Path(i["path"]) for i in json.loads((here / MANIFEST).read_text()).get("inputs", [])]
    return None


def log_eval(summary: dict, output_dir: str | Path) -> Path | None:
    """kiln eval's summary into the tracker runs of the training run behind what it scored: each
    metric as eval/<task>/<metric> (at the checkpoint's step when known), eval_summary.json attached.
    Returns that run directory, or None when the scored model has no tracked run."""
    artifact = summary.get("artifact", {})
    run_dir = find_run(artifact["path"]) if artifact.get("path") else None
    if run_dir is None:
        return None
    values = flatten({task: {name: m["value"] for name, m in figures.items()}
                      for task, figures in summary["metrics"].items()}, "eval/")
    step = artifact.get("step") or 0

    def post(run):
        run.log(step, values)
        run.attach(Path(output_dir) / "eval_summary.json", {"eval": {"output": str(Path(output_dir).resolve())}})

    _post(run_dir, post, "the eval results")
    return run_dir
