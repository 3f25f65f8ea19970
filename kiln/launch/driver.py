"""How a stage, or a pipeline, runs: the one place that decides it.

Every way in (the CLI, `kiln.launch.to_partial` from Python, a pipeline) goes through
`prepare`: the config is resolved (what can be derived, e.g. the vocabulary from the
tokenizer) and checked by every validator its stage registers, for the world size the launch
will have, before anything starts. Then `launch_stage` renders it (dry run), runs it in this
process (one rank, or already a rank under torchrun/srun), or submits it through NeMo-Run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kiln import overrides
from kiln.launch import ray_slurm, submit
from kiln.launch.config import LaunchConfig
from kiln.launch.task import run_stage, to_run_config
from kiln.pipeline import PipelineConfig, plan, status_table, summary_line
from kiln.stages import STAGES, Stage, load, stage_for
from kiln.validation import Check, Problems


def world_size(stage: Stage, cfg, launch: LaunchConfig | None = None, nproc: int | None = None) -> int:
    """Ranks the launch starts: Slurm's nodes x tasks; else --nproc, launch.nproc, the config's
    parallel.world_size, or TP x PP. Single-process stages always run as one."""
    if not stage.distributed:
        return 1
    if launch is not None and launch.executor == "slurm":
        return launch.slurm.nodes * launch.slurm.tasks_per_node
    return (nproc or (launch.nproc if launch else None) or cfg.parallel.world_size
            or cfg.parallel.tp * cfg.parallel.pp)


def prepare(stage: Stage, cfg, world: int | None = None, check: Check | None = None, echo=print):
    """(resolved copy of cfg, world size) after every registered validator passed; otherwise one
    ConfigError listing every problem. Notes (inputs missing on a dry run) go to `echo`."""
    resolved = load(stage.resolve)(copy.deepcopy(cfg)) if stage.resolve else copy.deepcopy(cfg)
    world = world or world_size(stage, resolved)
    check = dataclasses.replace(check or Check(), world_size=world)
    problems = Problems()
    for validator in stage.validators:
        load(validator)(resolved, check, problems)
    problems.raise_if_any(f"the {stage.name} config")
    for note in problems.notes:
        echo(f"note: {note}")
    return resolved, world


def file_checks(launch: LaunchConfig, dryrun: bool) -> str:
    """How validation treats missing input files: required where this machine sees the job's
    file system, noted on a dry run, left to the ranks behind an ssh tunnel or in a container."""
    if dryrun:
        return "note"
    if launch.executor == "local":
        return "require"
    if launch.executor == "slurm" and launch.slurm.tunnel == "local" and not launch.slurm.container_image:
        return "require"
    return "skip"


def executor_world(executor) -> int:
    """Ranks a NeMo-Run executor starts: nodes x (Slurm tasks, or torchrun processes) per node."""
    per_node = getattr(executor, "ntasks_per_node", None) or executor.nproc_per_node()
    return executor.nnodes() * per_node


def to_partial(cfg, executor=None, check: Check | None = None):
    """`run.Partial(run_stage, cfg=...)`, for `run.run` or `run.Experiment.add`. The config is
    resolved and validated first, for `executor`'s world size (or the config's own layout)."""
    import nemo_run as run

    stage = stage_for(cfg)
    world = executor_world(executor) if executor is not None else None
    cfg, _ = prepare(stage, cfg, world, check)
    if type(executor).__name__ == "SlurmExecutor" and hasattr(cfg, "checkpoint"):
        cfg.checkpoint.resume = True  # as kiln's own Slurm launches: a requeued job continues
    return run.Partial(run_stage, cfg=to_run_config(cfg))


def apply_launch_policy(cfg, launch: LaunchConfig) -> None:
    """Slurm jobs always resume: a requeued job continues from its checkpoint, and a first run
    starts from checkpoint.load_weights or from scratch."""
    if launch.executor == "slurm" and hasattr(cfg, "checkpoint"):
        cfg.checkpoint.resume = True


def launched_by_scheduler() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def launch_stage(stage: Stage, cfg, launch: LaunchConfig, nproc: int | None = None, dryrun: bool = False,
                 detach: bool = False, echo=print) -> int:
    """Validate, then render (dryrun), run here, or submit. Returns the process exit code."""
    from kiln.launch.task import execute

    cfg = copy.deepcopy(cfg)
    apply_launch_policy(cfg, launch)
    ray_slurm.check(cfg, launch)
    resolved, world = prepare(stage, cfg, world_size(stage, cfg, launch, nproc),
                              Check(files=file_checks(launch, dryrun)), echo)
    title = f"kiln-{stage.name}"
    if dryrun:
        if stage.describe:
            echo(load(stage.describe)(resolved, world))
        else:
            echo("# resolved config\n" + yaml.safe_dump(overrides.to_dict(resolved), sort_keys=False).rstrip())
        if ray_slurm.engine(cfg) == "ray" and launch.executor == "slurm":
            echo(ray_slurm.layout(resolved, launch))
        if _foreground(stage, launch) and world > 1:
            echo("# runs in the foreground\n" + shlex.join(foreground_command(stage, cfg, world, "<config.yaml>")))
        elif launch.executor != "local" or world > 1:
            echo(submit.render(title, [submit.Task(stage.name, cfg, world)], launch))
        echo("nothing was started (--dryrun)")
        return 0
    if launch.executor == "local" and (world == 1 or launched_by_scheduler()):
        summary = execute(cfg)  # exits 75 itself when preempted
        if not stage.distributed and isinstance(summary, dict):
            echo(f"kiln {stage.name}: {summary_line(stage.name, summary)} -> {stage.artifact_dir(cfg)}")
        return 0
    if _foreground(stage, launch):
        return run_foreground(stage, cfg, world)
    result = submit.submit(title, [submit.Task(stage.name, cfg, world)], launch, detach=detach)
    if detach:
        echo(f"submitted experiment {result.experiment_id} ({result.experiment_dir})")
        return 0
    echo(f"experiment {result.experiment_id}: {result.states}")
    if not result.ok:
        _report(result, echo)
    return 0 if result.ok else result.exit_code


def _foreground(stage: Stage, launch: LaunchConfig) -> bool:
    """A service on this machine (a stage that writes no artifact: `kiln serve`) runs its ranks under
    torchrun as a child in the foreground rather than as a NeMo-Run experiment, whose ranks run in a
    session of their own and outlive Ctrl-C."""
    return launch.executor == "local" and stage.artifact is None


def foreground_command(stage: Stage, cfg, world: int, config: str) -> list[str]:
    from kiln.training.distributed import free_port

    positional = [str(overrides.get_path(cfg, f.field)) for f in stage.flags if not f.name.startswith("-")]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), "-m", "kiln.cli", stage.name, *positional,
            "--config", config]


def run_foreground(stage: Stage, cfg, world: int) -> int:
    """Ctrl-C reaches torchrun too; SIGTERM is passed on."""
    from kiln.stages import dump_config

    with tempfile.TemporaryDirectory(prefix=f"kiln-{stage.name}-") as scratch:
        config = dump_config(cfg, Path(scratch) / "config.yaml")
        child = subprocess.Popen(foreground_command(stage, cfg, world, str(config)),
                                 env={"OMP_NUM_THREADS": "1", **os.environ})
        previous = signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        try:
            return child.wait()
        except KeyboardInterrupt:  # torchrun got it as well: wait while it stops the ranks
            return child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)


def launch_pipeline(pipeline: PipelineConfig, launch: LaunchConfig, dryrun: bool = False, detach: bool = False,
                    echo=print) -> int:
    """Validate every stage that is not fresh (each for its own world size, knowing which
    artifacts earlier stages will write), then submit them in order, each after the one before."""
    tasks, previous, upcoming = [], None, set()
    for p in plan(pipeline):
        echo(f"{p.name:<10} {'run' if p.runs else 'skip'} ({p.status})")
        if not p.runs:
            continue
        stage = STAGES[p.name]
        cfg = copy.deepcopy(p.cfg)
        apply_launch_policy(cfg, launch)
        ray_slurm.check(cfg, launch)
        _, world = prepare(stage, cfg, world_size(stage, cfg, launch),
                           Check(upcoming=set(upcoming), files=file_checks(launch, dryrun)), echo)
        upcoming.add(str(Path(stage.artifact_dir(cfg)).resolve()))
        tasks.append(submit.Task(p.name, cfg, world, after=[previous] if previous else []))
        previous = p.name
    if not tasks:
        if not dryrun:
            _write_report(pipeline, echo)
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
                _report(result, echo)
                echo(f"{task.name} failed ({result.states}); the stages after it were not started")
                ok = False
                break
    echo(status_table(pipeline))
    if not (launch.executor == "slurm" and detach):
        _write_report(pipeline, echo)
    return 0 if ok else 1


def _write_report(pipeline: PipelineConfig, echo) -> None:
    """The pipeline's report page, also after a failed stage (the stages after it listed as not run);
    a report that cannot be written is said, and does not change the pipeline's exit code."""
    from kiln.errors import KilnError
    from kiln.report import report_pipeline

    try:
        echo(f"report: {report_pipeline(pipeline, partial=True)}")
    except KilnError as exc:
        echo(f"report not written: {exc}")


def launch_aligner(stage: Stage, cfg, launch: LaunchConfig, nemo: str, dryrun: bool, echo=print) -> int:
    """`--backend nemo-aligner`: NeMo-Aligner's own trainer for this request, in its container."""
    from kiln.alignment import aligner
    from kiln.errors import ConfigError

    nodes = launch.slurm.nodes if launch.executor == "slurm" else 1
    devices = (launch.slurm.gpus_per_node or 8) if launch.executor == "slurm" else 8
    script = "\n".join(["set -euo pipefail", *aligner.render(stage.name, cfg, nemo, nodes, devices)])
    if launch.executor == "docker" and launch.docker.image == LaunchConfig().docker.image:
        launch.docker.image = aligner.ALIGNER_IMAGE
    if dryrun:
        echo(script)
        return 0
    if launch.executor == "local":
        raise ConfigError("--backend nemo-aligner runs in NeMo-Aligner's container: use --executor slurm "
                          "(with launch.slurm.container_image) or --executor docker; --dryrun prints the command")
    aligner.write_data(stage.name, cfg)
    result = submit.submit(f"kiln-{stage.name}-aligner", [submit.Task(stage.name, script, 1)], launch)
    echo(f"experiment {result.experiment_id}: {result.states}")
    return 0 if result.ok else 1


def _report(result: submit.Launched, echo) -> None:
    errors = submit.reported_errors(result.experiment_dir)
    for line in errors:
        echo(line)
    if not errors:
        echo(f"kiln: the job failed without a kiln error; its logs are under {result.experiment_dir}")


def _set_aside(artifact: Path) -> None:
    if artifact.exists():
        artifact.rename(artifact.with_name(f"{artifact.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
