"""Where and how a stage runs: typed launch configs for the local, Slurm and Docker executors.

Kept apart from stage configs, so a recipe says what to train and a launch config (or a
site profile in slurm/sites/) says where, and neither leaks into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# NGC NeMo image whose megatron-core matches kiln's pin (docker/README.md has the table)
NGC_IMAGE = "nvcr.io/nvidia/nemo:25.11"

# tokens passed by name from the submitting environment, never written anywhere
DEFAULT_SECRETS = ["HF_TOKEN", "WANDB_API_KEY", "NGC_API_KEY"]


@dataclass
class SlurmConfig:
    account: str = ""
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU (srun starts each; no torchrun)
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "0" for the whole node
    time: str = "01:00:00"
    exclusive: bool = False
    requeue: bool = True  # on preemption: requeue this job; false: submit a dependent copy
    signal: str | None = "USR1@120"  # sent to every rank this long before the time limit
    container_image: str | None = None  # pyxis/enroot image; None runs on the host
    container_mounts: list = field(default_factory=list)
    tunnel: Literal["local", "ssh"] = "local"  # local: sbatch on this (login) node
    host: str | None = None  # ssh tunnel: login node
    user: str | None = None
    identity: str | None = None  # ssh key file
    remote_job_dir: str | None = None  # ssh tunnel: where job files live on the cluster
    setup_lines: list = field(default_factory=list)  # shell lines before srun (module load ...)
    srun_args: list = field(default_factory=list)


@dataclass
class DockerConfig:
    image: str = NGC_IMAGE
    gpus: int | None = None  # None: all of the host's GPUs
    shm_size: str = "16g"
    ipc_mode: str = "host"
    ulimits: list = field(default_factory=lambda: ["memlock:-1", "stack:67108864"])
    volumes: list = field(default_factory=list)  # "host_path:container_path"


@dataclass
class LaunchConfig:
    executor: Literal["local", "slurm", "docker"] = "local"
    nproc: int | None = None  # ranks on one machine (local, docker); None: from the stage config
    env: dict = field(default_factory=dict)  # non-secret variables, exported explicitly into the job
    secrets: list = field(default_factory=lambda: list(DEFAULT_SECRETS))
    experiments_dir: str | None = None  # NeMo-Run's home; None: $NEMORUN_HOME or ~/.nemo_run
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
