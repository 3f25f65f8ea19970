"""NeMo-Run executors built from kiln's LaunchConfig: local (torchrun), Slurm (sbatch + srun,
pyxis containers) and Docker (NGC image)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import tempfile
from pathlib import Path

import kiln
from kiln.errors import ConfigError
from kiln.launch.config import LaunchConfig
from kiln.launch.secrets import check_names, present

SECRETS_FILE_IN_CONTAINER = "/run/kiln/secrets.env"


def experiments_home(launch: LaunchConfig) -> Path:
    """NeMo-Run's home: experiments live under <home>/experiments/<title>/<title>_<id>/."""
    home = launch.experiments_dir or os.environ.get("NEMORUN_HOME", "~/.nemo_run")
    return Path(home).expanduser().resolve()


def build(launch: LaunchConfig, nproc: int, dryrun: bool = False):
    check_names(launch.secrets, launch.env)
    if launch.executor == "local":
        return local(launch, nproc)
    if launch.executor == "slurm":
        return slurm(launch, single_task=nproc == 1)
    if launch.executor == "docker":
        return docker(launch, nproc, dryrun)
    raise ConfigError(f"launch.executor={launch.executor!r}: choose local, slurm or docker")


def local(launch: LaunchConfig, nproc: int):
    import nemo_run as run

    # NeMo-Run starts `python`/`torchrun` from PATH: put this interpreter's bin first (field notes)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {"LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1", **launch.env, "PATH": path}
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun" if nproc > 1 else None,
                             env_vars=env)


def packager(launch: LaunchConfig):
    """`ship`: NeMo-Run's PatternPackager puts this installation's kiln/ into the job's code
    directory (`/nemo_run/code` in a container), the ranks' working directory, which `python -m`
    puts first on sys.path: the job runs the code it was submitted with, uncommitted edits
    included, whatever kiln the image holds. `image`: nothing is shipped."""
    import nemo_run as run

    if launch.code == "image":
        return run.Packager()
    root = str(Path(kiln.__file__).resolve().parents[1])
    return run.PatternPackager(include_pattern=[f"{root}/kiln"], relative_path=[root])


def slurm(launch: LaunchConfig, single_task: bool = False):
    """One srun task per rank (kiln reads SLURM_PROCID/SLURM_NTASKS). The batch script, on the
    batch host where Slurm's commands exist, exports the rendezvous address to every task
    (MASTER_ADDR: the job's first node, as NeMo-Run's script computes it) and, after srun ends,
    requeues a job whose rank 0 left a preemption marker (`slurm.exit_trap`, added per task by
    kiln.launch.submit): inside a pyxis container there is no scontrol. A single-process stage
    (prepare, curate) gets one task on one node whatever the site's layout."""
    import nemo_run as run

    s = dataclasses.replace(launch.slurm, nodes=1, tasks_per_node=1) if single_task else launch.slurm
    if s.tunnel == "ssh":
        if not (s.host and s.user and s.remote_job_dir):
            raise ConfigError("launch.slurm.tunnel=ssh needs launch.slurm.host, .user and .remote_job_dir")
        tunnel = run.SSHTunnel(host=s.host, user=s.user, job_dir=s.remote_job_dir, identity=s.identity)
    else:
        # NeMo-Run's LocalTunnel must point at its own experiments folder, or sbatch cannot open
        # the script it wrote (field notes)
        tunnel = run.LocalTunnel(job_dir=str(experiments_home(launch) / "experiments"))
    # exported by the batch script, in this order, before srun: Slurm's own directory first (the
    # exit trap calls scontrol from it whatever PATH the job sets), then the rank-0 address
    env = {"KILN_SLURM_BIN": '"$(dirname "$(command -v scontrol)")"', "MASTER_ADDR": "$head_node"}
    # values are exported as `export K=V`: quote them for the shell
    env.update({key: shlex.quote(str(value)) for key, value in launch.env.items()})
    env["KILN_ON_PREEMPT"] = "requeue" if s.requeue else "resubmit"
    env["KILN_PREEMPT_DIR"] = "/nemo_run"  # the task's job dir: mounted in a container, the path itself on a host
    if s.tunnel == "local":
        # relative paths in the config mean what they meant where the job was submitted
        env["KILN_WORKDIR"] = shlex.quote(os.getcwd())
    if not s.container_image:
        # on the host, ranks must find this installation's python first
        env["PATH"] = f"{shlex.quote(str(Path(sys.executable).parent))}:$PATH"
    extra = {"requeue": True} if s.requeue else {"no-requeue": True}
    return run.SlurmExecutor(
        account=s.account,
        job_name_prefix="kiln-",
        partition=s.partition,
        nodes=s.nodes,
        ntasks_per_node=s.tasks_per_node,
        gpus_per_node=s.gpus_per_node,
        cpus_per_task=s.cpus_per_task,
        mem=s.mem,
        time=s.time,
        exclusive=s.exclusive or None,
        signal=s.signal,
        container_image=s.container_image,
        container_mounts=list(s.container_mounts),
        # pyxis copies these variables from the job's environment into the container: the
        # explicit env and the secrets, by name, so nothing relies on the image's ENV
        container_env=[*(k for k in env if k != "KILN_SLURM_BIN"), *launch.secrets] if s.container_image else None,
        env_vars=env,
        additional_parameters=extra,
        setup_lines="\n".join(s.setup_lines) or None,
        srun_args=list(s.srun_args) or None,
        tunnel=tunnel,
        packager=packager(launch),
        retries=0,  # kiln requeues on preemption only; a crash is not retried blindly
    )


def docker(launch: LaunchConfig, nproc: int, dryrun: bool = False):
    import nemo_run as run

    d = launch.docker
    volumes = list(d.volumes)
    env = dict(launch.env)
    secrets = present(launch.secrets)
    if secrets:
        host_file = "<secrets file written at launch>" if dryrun else write_secrets_file(launch, secrets)
        volumes.append(f"{host_file}:{SECRETS_FILE_IN_CONTAINER}:ro")
        env["KILN_SECRETS_FILE"] = SECRETS_FILE_IN_CONTAINER
    return run.DockerExecutor(
        container_image=d.image,
        num_gpus=d.gpus if d.gpus is not None else -1,
        runtime="nvidia",
        ntasks_per_node=nproc,
        launcher="torchrun" if nproc > 1 else None,
        shm_size=d.shm_size,
        ipc_mode=d.ipc_mode,
        ulimits=list(d.ulimits),
        volumes=volumes,
        env_vars=env,
        packager=packager(launch),
    )


def write_secrets_file(launch: LaunchConfig, names: list[str]) -> Path:
    """A 0600 file of NAME=value lines for the container to read at start; it is the only place
    a secret's value is written, inside the user's own 0700 directory."""
    directory = experiments_home(launch) / "secrets"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    fd, path = tempfile.mkstemp(dir=directory, suffix=".env")
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{name}={os.environ[name]}\n" for name in names)
    return Path(path)
