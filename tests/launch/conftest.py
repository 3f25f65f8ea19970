"""The single-node Slurm cluster (slurmctld + slurmd + munge on this machine, started by
slurm/local-cluster.sh) that the Slurm tests submit to, and stand-ins that hide Slurm's commands from
a job's tasks, as inside a pyxis container."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLUSTER = ROOT / "slurm" / "local-cluster.sh"
SLURM_COMMANDS = ("scontrol", "sbatch", "squeue", "scancel", "sinfo", "sacct")

needs_slurm = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("slurmctld") or not shutil.which("munged"),
    reason="needs root and Debian's slurm-wlm and munge (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """A cluster per test module; a module may set SLURM_PORTS = (slurmctld, slurmd) so that two
    modules' clusters can run at once."""
    ctld, slurmd = getattr(request.module, "SLURM_PORTS", (16817, 16818))
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "KILN_SLURM_DIR": str(state), "KILN_SLURMCTLD_PORT": str(ctld),
           "KILN_SLURMD_PORT": str(slurmd)}
    out = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=60)
    os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="module")
def no_slurm_in_tasks(tmp_path_factory) -> Path:
    """A directory of stand-ins for Slurm's commands that fail, as if absent."""
    stubs = tmp_path_factory.mktemp("no-slurm")
    for name in SLURM_COMMANDS:
        message = f"{name}: not available inside the job's container"
        (stubs / name).write_text(f'#!/bin/sh\necho "{message}" >&2\nexit 127\n')
        (stubs / name).chmod(0o755)
    return stubs
