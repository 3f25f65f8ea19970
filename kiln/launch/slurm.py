"""What a preempted Slurm job does after its checkpoint: run again, from that checkpoint.

With `launch.slurm.requeue` (the default) rank 0 requeues its own job; the scheduler ends
this run and starts the same batch script again, which resumes. Where requeue is not
allowed, it submits a copy of the batch script that starts once this job has ended
(`--dependency=afterany`). The launcher passes the choice in KILN_ON_PREEMPT.
"""

from __future__ import annotations

import os
import re
import subprocess


def after_preemption() -> None:
    job = os.environ["SLURM_JOB_ID"]
    mode = os.environ.get("KILN_ON_PREEMPT", "requeue")
    if mode == "requeue":
        _run(["scontrol", "requeue", job])
        print(f"kiln: requeued Slurm job {job}; it resumes from the checkpoint", flush=True)
    elif mode == "resubmit":
        script = batch_script(job)
        out = _run(["sbatch", "--parsable", f"--dependency=afterany:{job}", script])
        print(f"kiln: submitted job {out.strip()} to resume after job {job}", flush=True)


def batch_script(job: str) -> str:
    info = _run(["scontrol", "show", "job", job, "-o"])
    match = re.search(r"\bCommand=(\S+)", info)
    if not match:
        raise RuntimeError(f"scontrol shows no batch script for job {job}: cannot resubmit")
    return match.group(1)


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


class SlurmError(RuntimeError):
    """The cluster cannot take the job; the message says what to check."""


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def check_cluster(partition: str | None) -> None:
    """Fail before submitting when the controller is unreachable or the partition is unknown."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError("sinfo is not installed here: submit from a Slurm login node, or use "
                         "launch.slurm.tunnel=ssh with launch.slurm.host") from None
    if out.returncode != 0:
        raise SlurmError(f"cannot reach the Slurm controller ({out.stderr.strip() or 'sinfo failed'}); "
                         f"check that slurmctld runs and SLURM_CONF points at its slurm.conf")
    partitions = sorted(set(out.stdout.split()))
    if partition and partition not in partitions:
        raise SlurmError(f"launch.slurm.partition={partition} does not exist on this cluster; "
                         f"partitions: {', '.join(partitions) or 'none'}")


def job_id(handle: str) -> str:
    """NeMo-Run's app handle ends in the Slurm job id (slurm_tunnel://nemo_run/<id>)."""
    return handle.rstrip("/").rsplit("/", 1)[-1]


def state(job: str) -> str:
    """JobState from scontrol (works without accounting storage, unlike sacct). A job whose
    dependency failed is cancelled here: clusters without kill_invalid_depend keep it pending
    forever, and a failed stage must stop its dependants."""
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    match = re.search(r"\bJobState=(\S+)", out)
    if match and match.group(1) == "PENDING" and "Reason=DependencyNeverSatisfied" in out:
        subprocess.run(["scancel", job], capture_output=True)
        return "CANCELLED"
    return match.group(1) if match else "UNKNOWN"


def wait(jobs: dict[str, str], poll_seconds: float = 2.0, on_change=print) -> dict[str, str]:
    """Poll until every job (name -> id) is terminal; report each state change."""
    import time

    states: dict[str, str] = {}
    while True:
        for name, job in jobs.items():
            current = state(job)
            if states.get(name) != current:
                on_change(f"{name} (job {job}): {current}")
                states[name] = current
        if all(s in TERMINAL or s == "UNKNOWN" for s in states.values()):
            return states
        time.sleep(poll_seconds)
