"""Launch stages as one NeMo-Run experiment on any executor, or render what would be launched.

The experiment directory (<home>/experiments/<title>/<title>_<id>/) keeps NeMo-Run's own
serialized tasks plus `<task>.yaml`, each stage's resolved kiln config, for a reader.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kiln.launch import executors, ray_slurm, slurm
from kiln.launch.config import LaunchConfig
from kiln.launch.secrets import scrub
from kiln.launch.task import run_stage, to_run_config
from kiln.stages import dump_config


@dataclass
class Task:
    name: str
    cfg: object  # a stage config; a shell script (str); or a run.Script (a Ray driver: kiln.launch.ray_slurm)
    nproc: int = 1
    after: list = field(default_factory=list)  # names of tasks that must succeed first


@dataclass
class Launched:
    experiment_id: str
    experiment_dir: Path
    states: dict  # task name -> NeMo-Run state (SUCCEEDED, FAILED, RUNNING, ...)
    slurm_jobs: dict = field(default_factory=dict)  # task name -> Slurm job id

    @property
    def ok(self) -> bool:
        return all(state == "SUCCEEDED" for state in self.states.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def _experiment(title: str, launch: LaunchConfig):
    import nemo_run as run

    home = executors.experiments_home(launch)
    return run.Experiment(title, base_dir=str(home), enable_goodbye_message=False, log_level="WARN")


def _add_all(exp, tasks: list[Task], launch: LaunchConfig, dryrun: bool = False) -> dict[str, str]:
    import nemo_run as run

    ids: dict[str, str] = {}
    for task in tasks:
        after = [ids[a] for a in task.after] or None
        if ray_slurm.starts_cluster(task.cfg, launch):  # engine=ray: a Ray cluster across the allocation
            ids[task.name] = exp.add(ray_slurm.driver(task.name, task.cfg), executor=ray_slurm.executor(launch),
                                     name=task.name, dependencies=after)
            ray_slurm.complete(exp.jobs[-1], launch, task.cfg)
            continue
        executor = executors.build(launch, task.nproc, dryrun)
        # a string is a shell script (another framework's trainer); a config is a kiln stage
        fn = run.Script(inline=task.cfg) if isinstance(task.cfg, str) else \
            run.Partial(run_stage, cfg=to_run_config(task.cfg))
        ids[task.name] = exp.add(fn, executor=executor, name=task.name, dependencies=after)
        if launch.executor == "slurm":
            _add_exit_trap(exp.jobs[-1].executor, launch)
    return ids


def _add_exit_trap(executor, launch: LaunchConfig) -> None:
    """The requeue step, last in the batch script's setup: its job directory (as the batch host
    sees it) is known only once NeMo-Run has assigned the task to the experiment."""
    job_dir = f"{executor.tunnel.job_dir}/{Path(executor.job_dir).name}"
    mode = "requeue" if launch.slurm.requeue else "resubmit"
    executor.setup_lines = "\n".join(filter(None, [executor.setup_lines, slurm.exit_trap(job_dir, mode)]))


def render(title: str, tasks: list[Task], launch: LaunchConfig) -> str:
    """The exact sbatch scripts / docker requests / commands, with secrets scrubbed."""
    import nemo_run as run

    parts = []
    # NeMo-Run saves a dry run's experiment on leaving its context: give it a scratch home, so a
    # dry run writes nothing (the script's own paths come from the tunnel, not this home)
    with tempfile.TemporaryDirectory(prefix="kiln-dryrun-") as scratch:
        with run.Experiment(title, base_dir=scratch, enable_goodbye_message=False, log_level="WARN") as exp:
            _add_all(exp, tasks, launch, dryrun=True)
            exp.dryrun(log=False, delete_exp_dir=True)
            for job in exp.jobs:
                request = job._dryrun_info.request
                body = request.materialize() if hasattr(request, "materialize") else str(request)
                parts.append(f"# ---- task {job.id} ({launch.executor}) ----\n{body.rstrip()}\n")
    return scrub("\n".join(parts), launch.secrets)


def submit(title: str, tasks: list[Task], launch: LaunchConfig, detach: bool = False,
           tail_logs: bool = True) -> Launched:
    on_slurm = launch.executor == "slurm"
    if on_slurm and launch.slurm.tunnel == "local":
        slurm.check_cluster(launch.slurm.partition)
    exp = _experiment(title, launch)
    with exp:
        _add_all(exp, tasks, launch)
        # Slurm jobs are always submitted detached and then watched with scontrol: NeMo-Run's own
        # wait needs sacct, which clusters without accounting storage lack
        exp.run(detach=detach or on_slurm, tail_logs=tail_logs and not on_slurm)
        exp_dir = Path(exp._exp_dir)  # NeMo-Run creates it when the run starts
        for task in tasks:
            if dataclasses.is_dataclass(task.cfg):
                dump_config(task.cfg, exp_dir / f"{task.name}.yaml")
        job_ids = {job.id: slurm.job_id(job.handle) for job in exp.jobs} if on_slurm else {}
    if detach:
        return Launched(exp._id, exp_dir, {}, job_ids)
    if on_slurm:
        states = slurm.wait(job_ids)
        return Launched(exp._id, exp_dir, {k: _as_nemo_state(v) for k, v in states.items()}, job_ids)
    # leaving the `with` block waited for local and docker jobs
    return Launched(exp._id, exp_dir, {job.id: job.state.name for job in exp.jobs})


def reported_errors(experiment_dir: Path) -> list[str]:
    """The one-line errors kiln's ranks printed (`kiln: ...`), from every log of an experiment,
    each once: what a failed launch ends with, below torchrun's and the scheduler's noise."""
    seen: dict[str, None] = {}
    for log in sorted(p for p in Path(experiment_dir).rglob("*") if p.suffix in (".log", ".out") and p.is_file()):
        for line in log.read_text(errors="replace").splitlines():
            line = line.split("]:", 1)[-1].strip() if line.startswith("[") else line.strip()  # torchrun's tee prefix
            if line.startswith("kiln: "):
                seen.setdefault(line, None)
    return list(seen)


def _as_nemo_state(slurm_state: str) -> str:
    return "SUCCEEDED" if slurm_state == "COMPLETED" else slurm_state
