"""Where and how a stage runs: typed launch configs for the local, Slurm and Docker executors.

Kept apart from stage configs, so a recipe says what to train and a launch config (or a
site profile in slurm/sites/) says where, and neither leaks into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import kiln
from kiln.config import AT_LEAST_1, NON_NEGATIVE, ranged

# The NGC NeMo image docker/Dockerfile builds on: CUDA 13.0, PyTorch 2.9, TransformerEngine 2.9 (inside
# megatron-core 0.16.1's range), NeMo 2.6. No NeMo image ships megatron-core 0.16.1 (25.11 has 0.15),
# so jobs run in the kiln image built from it, not in the stock image (docker/README.md).
NGC_BASE_IMAGE = "nvcr.io/nvidia/nemo:25.11"
KILN_IMAGE = f"kiln:{kiln.__version__}"  # `make image`; push it where the cluster pulls from

# tokens passed by name from the submitting environment, never written anywhere
DEFAULT_SECRETS = ["HF_TOKEN", "WANDB_API_KEY", "NGC_API_KEY"]


@dataclass
class SlurmRayConfig:
    """The Ray cluster kiln starts across a Slurm allocation for a stage with engine=ray (one Ray
    node per Slurm node; Ray's CPUs per node: the stage's ray.num_cpus, else what Slurm allocated)."""

    object_store_mb: int | None = ranged(None, AT_LEAST_1)  # per node; None: Ray's default (30% of memory)
    start_timeout: int = ranged(600, AT_LEAST_1)  # seconds for the head and every worker to be up


@dataclass
class SlurmConfig:
    account: str = ""
    partition: str | None = None
    nodes: int = ranged(1, AT_LEAST_1)
    tasks_per_node: int = ranged(1, AT_LEAST_1)  # ranks per node: one per GPU (srun starts each; no torchrun)
    gpus_per_node: int | None = ranged(None, NON_NEGATIVE)
    cpus_per_task: int | None = ranged(None, AT_LEAST_1)
    mem: str | None = None  # e.g. "0" for the whole node
    time: str = "01:00:00"
    exclusive: bool = False
    requeue: bool = True  # on preemption: requeue this job; false: submit a dependent copy
    signal: str | None = "USR1@120"  # sent to every rank this long before the time limit
    container_image: str | None = None  # pyxis/enroot image (the kiln image); None runs on the host
    container_mounts: list = field(default_factory=list)
    tunnel: Literal["local", "ssh"] = "local"  # local: sbatch on this (login) node
    host: str | None = None  # ssh tunnel: login node
    user: str | None = None
    identity: str | None = None  # ssh key file
    remote_job_dir: str | None = None  # ssh tunnel: where job files live on the cluster
    setup_lines: list = field(default_factory=list)  # shell lines before srun (module load ...)
    srun_args: list = field(default_factory=list)
    ray: SlurmRayConfig = field(default_factory=SlurmRayConfig)  # stages with engine=ray


@dataclass
class DockerConfig:
    image: str = KILN_IMAGE
    gpus: int | None = ranged(None, NON_NEGATIVE)  # None: all of the host's GPUs
    shm_size: str = "16g"
    ipc_mode: str = "host"
    ulimits: list = field(default_factory=lambda: ["memlock:-1", "stack:67108864"])
    volumes: list = field(default_factory=list)  # "host_path:container_path"


@dataclass
class LaunchConfig:
    executor: Literal["local", "slurm", "docker"] = "local"
    # ship: the submitting checkout's kiln/ travels with the job (NeMo-Run's PatternPackager) and is
    # imported before the image's, so a job runs the code it was submitted with; image: the image's own
    code: Literal["ship", "image"] = "ship"
    nproc: int | None = ranged(None, AT_LEAST_1)  # ranks on one machine (local, docker); None: from the stage config
    env: dict = field(default_factory=dict)  # non-secret variables, exported explicitly into the job
    secrets: list = field(default_factory=lambda: list(DEFAULT_SECRETS))
    experiments_dir: str | None = None  # NeMo-Run's home; None: $NEMORUN_HOME or ~/.nemo_run
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
