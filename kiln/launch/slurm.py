"""Slurm: what a preempted job does, and watching jobs from the submitting side.

A preempted job runs again from its checkpoint. Rank 0 only leaves a marker in its job
directory (`preempted_<job>_<restart>`); the batch script's exit trap, on the batch host where
Slurm's commands exist (inside a pyxis container there is no scontrol), then requeues the job,
or with `launch.slurm.requeue=false` submits a copy that starts after this one ends
(`--dependency=afterany`). A marker per restart count never triggers a second requeue.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from kiln.errors import SlurmError

MARKER = "preempted_{job}_{restart}"


def exit_trap(job_dir: str, mode: str) -> str:
    """Batch-script lines, run on the batch host after srun: act on rank 0's preemption marker.
    Slurm's commands come from KILN_SLURM_BIN, resolved before the job's own PATH is exported."""
    marker = f'{job_dir}/{MARKER.format(job="${SLURM_JOB_ID}", restart="${SLURM_RESTART_COUNT:-0}")}'
    bin_ = '"${KILN_SLURM_BIN:-/usr/bin}"'
    if mode == "requeue":
        action = f'{bin_}/scontrol requeue "$SLURM_JOB_ID" && echo "kiln: requeued job $SLURM_JOB_ID"'
    else:
        action = (f'script=$({bin_}/scontrol show job "$SLURM_JOB_ID" -o | grep -o "Command=[^ ]*" | cut -d= -f2); '
                  f'{bin_}/sbatch --parsable --dependency=afterany:"$SLURM_JOB_ID" "$script" '
                  f'&& echo "kiln: submitted a copy of job $SLURM_JOB_ID to resume after it"')
    return "\n".join([
        "# kiln: after srun, outside any container: requeue if rank 0 checkpointed for a preemption",
        f'kiln_after_job() {{ rc=$?; if [ -f "{marker}" ]; then {action}; fi; exit $rc; }}',
        "trap kiln_after_job EXIT",
    ])


def after_preemption() -> None:
    """Rank 0, after the preemption checkpoint: leave the marker the batch script acts on. A job
    whose script kiln did not write (`srun kiln ...` in one's own sbatch) has no marker
    directory: it requeues itself when scontrol is at hand."""
    job, restart = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT", "0")
    directory = os.environ.get("KILN_PREEMPT_DIR")
    if directory:
        (Path(directory) / MARKER.format(job=job, restart=restart)).touch()
        print(f"kiln: preempted; the batch script {os.environ.get('KILN_ON_PREEMPT', 'requeue')}s job {job}",
              flush=True)
    elif shutil.which("scontrol"):
        _run(["scontrol", "requeue", job])
        print(f"kiln: requeued Slurm job {job}; it resumes from the checkpoint", flush=True)
    else:
        print(f"kiln: preempted, but job {job} cannot be requeued from here (no scontrol, no kiln batch "
              f"script); resubmit it with --resume", flush=True)


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


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
