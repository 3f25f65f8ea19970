"""kiln's Slurm executor against a real single-node cluster (slurmctld + slurmd + munge on this
machine, started by slurm/local-cluster.sh): jobs under srun, preemption and requeue, dependent
stages, and the errors a user meets first.

The tasks run as inside a pyxis container: Slurm's commands are shadowed on their PATH by stand-ins
that fail. So rendezvous must come from the batch script (MASTER_ADDR), and the requeue from its
exit trap on the batch host; a rank that called scontrol would fail the test."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from kiln.launch import slurm, submit
from kiln.launch.config import LaunchConfig
from kiln.recipes.pretrain import tiny
from tests.conftest import read_metrics, tiny_overrides
from tests.launch.conftest import needs_slurm

STEPS = 12

pytestmark = [pytest.mark.slow, needs_slurm]  # the cluster and no_slurm_in_tasks fixtures: conftest.py


def launch_config(no_slurm: Path) -> LaunchConfig:
    launch = LaunchConfig(executor="slurm")
    launch.slurm.partition = "debug"
    launch.slurm.tasks_per_node = 2
    launch.slurm.time = "00:20:00"
    # after the batch script's own Slurm calls, before srun: the tasks inherit this PATH
    launch.slurm.setup_lines = [f"export PATH={no_slurm}:$PATH"]
    return launch


def tiny_cfg(demo_data, run_dir, **extra):
    from kiln import overrides
    from kiln.training.pretrain import resolve

    cfg = tiny()
    overrides.apply(cfg, tiny_overrides(demo_data, run_dir, train__steps=str(STEPS), **extra))
    cfg.checkpoint.resume = True  # what the launcher sets for every Slurm job
    return resolve(cfg)


@pytest.fixture(scope="module")
def straight(cluster, demo_data, tmp_path_factory, no_slurm_in_tasks):
    """An uninterrupted tiny run under srun: 2 tasks, torch.distributed from Slurm's variables."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    # progress_bar unset: kiln decides, and srun gives tasks a pseudo-terminal (SLURM_UNBUFFEREDIO)
    cfg = tiny_cfg(demo_data, run_dir, logging__progress_bar="null")
    result = submit.submit("kiln-test", [submit.Task("pretrain", cfg, 2)], launch_config(no_slurm_in_tasks))
    return result, run_dir


def test_pretrain_under_srun(straight):
    result, run_dir = straight
    assert result.states == {"pretrain": "SUCCEEDED"}, result
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    log = next(result.experiment_dir.glob("pretrain/log-*.out")).read_text()
    assert "TP=2 PP=1 DP=1 on 2 cpu process(es)" in log  # torch.distributed from SLURM_PROCID/NTASKS
    assert "not available inside the job's container" not in log  # no rank reached for a Slurm command
    assert "\x1b[" not in log and "step     10 | loss" in log  # plain log lines, no progress bar


def test_signal_checkpoints_requeues_and_resumes_exactly(straight, demo_data, tmp_path, no_slurm_in_tasks):
    preempted = tmp_path / "preempted"
    launch = launch_config(no_slurm_in_tasks)
    result = submit.submit("kiln-test", [submit.Task("pretrain", tiny_cfg(demo_data, preempted), 2)], launch,
                           detach=True)
    job = result.slurm_jobs["pretrain"]
    deadline = time.time() + 600
    while not (preempted / "metrics.jsonl").exists() or len(read_metrics(preempted)) < 3:
        assert time.time() < deadline and slurm.state(job) in ("PENDING", "RUNNING"), slurm.state(job)
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    deadline = time.time() + 300
    # Slurm holds a requeued job for a fixed 2 minutes (BeginTime); release it once it is pending
    # again: while the first run is still completing (slow under load) scontrol refuses the update
    while _restarts(job) == 0 or slurm.state(job) != "PENDING":
        assert time.time() < deadline, slurm.state(job)
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    final = slurm.wait({"pretrain": job}, on_change=lambda _: None)
    assert final == {"pretrain": "COMPLETED"}, _logs(result.experiment_dir)
    logs = _logs(result.experiment_dir)
    assert "kiln: requeued job" in logs and "not available inside the job's container" not in logs, logs
    a, b = read_metrics(straight[1]), read_metrics(preempted)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)
    saved = sorted(p.name for p in (preempted / "checkpoints").glob("iter_*"))
    assert saved[0] != f"iter_{STEPS:07d}"  # the preemption checkpoint, then the final one


def _logs(experiment_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(experiment_dir.rglob("*.out")))


def _squeue(job: str | None = None) -> dict[str, str]:
    """Job id -> name for the jobs Slurm still lists (finished ones stay for MinJobAge)."""
    command = ["squeue", "-h", "-t", "all", "-o", "%i %j"] + (["-j", job] if job else [])
    out = subprocess.run(command, capture_output=True, text=True).stdout
    return dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())


def _restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    return int(out.split("Restarts=")[1].split()[0]) if "Restarts=" in out else 0


def test_failing_stage_stops_its_dependants(cluster, demo_data, tmp_path, no_slurm_in_tasks):
    from kiln.config import PrepareConfig

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n')
    prepare = PrepareConfig(inputs=[str(bad)], output_dir=str(tmp_path / "data"))
    pretrain = tiny_cfg(demo_data, tmp_path / "run")
    tasks = [submit.Task("prepare", prepare, 1), submit.Task("pretrain", pretrain, 2, after=["prepare"])]
    result = submit.submit("kiln-test", tasks, launch_config(no_slurm_in_tasks))
    assert result.states["prepare"] == "FAILED"
    assert result.states["pretrain"] == "CANCELLED"  # afterok can never be satisfied
    assert not (tmp_path / "run").exists()
    log = next(result.experiment_dir.glob("prepare/log-*.out")).read_text()
    assert "bad.jsonl:2: not valid JSON" in log


def test_unknown_partition_is_named(cluster, demo_data, tmp_path, no_slurm_in_tasks):
    launch = launch_config(no_slurm_in_tasks)
    launch.slurm.partition = "gpu-h100"
    with pytest.raises(slurm.SlurmError, match="launch.slurm.partition=gpu-h100 does not exist on this "
                                               "cluster; partitions: debug"):
        submit.submit("kiln-test", [submit.Task("pretrain", tiny_cfg(demo_data, tmp_path), 2)], launch)


def test_unreachable_controller_is_named(cluster, demo_data, tmp_path, monkeypatch, no_slurm_in_tasks):
    conf = Path(os.environ["SLURM_CONF"]).read_text().replace("SlurmctldPort=16817", "SlurmctldPort=16999")
    (tmp_path / "slurm.conf").write_text(conf)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    with pytest.raises(slurm.SlurmError, match="cannot reach the Slurm controller"):
        submit.submit("kiln-test", [submit.Task("pretrain", tiny_cfg(demo_data, tmp_path / "r"), 2)],
                      launch_config(no_slurm_in_tasks))


def test_without_requeue_a_dependent_copy_resumes(straight, demo_data, tmp_path, no_slurm_in_tasks):
    preempted = tmp_path / "preempted"
    launch = launch_config(no_slurm_in_tasks)
    launch.slurm.requeue = False
    result = submit.submit("kiln-test", [submit.Task("pretrain", tiny_cfg(demo_data, preempted), 2)], launch,
                           detach=True)
    job = result.slurm_jobs["pretrain"]
    deadline = time.time() + 600
    while not (preempted / "metrics.jsonl").exists() or len(read_metrics(preempted)) < 3:
        assert time.time() < deadline and slurm.state(job) in ("PENDING", "RUNNING"), slurm.state(job)
        time.sleep(0.3)
    name = _squeue(job)[job]
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # The copy is found by its name, not by squeue's dependency column: once the first job has
    # ended Slurm clears `afterany:<job>`, and on a slow machine polling can miss that window.
    copies = []
    deadline = time.time() + 300
    while not copies:
        assert time.time() < deadline
        copies = [i for i, n in _squeue().items() if n == name and int(i) > int(job)]
        time.sleep(0.3)
    assert slurm.wait({"copy": copies[0]}, on_change=lambda _: None) == {"copy": "COMPLETED"}
    assert _restarts(job) == 0  # the first job was not requeued: a second job finished the run
    a, b = read_metrics(straight[1]), read_metrics(preempted)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)
