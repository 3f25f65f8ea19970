"""Process-group set-up from the launcher's environment: torchrun or Slurm's srun."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

import kiln
from kiln.config import ParallelConfig
from kiln.errors import LaunchError


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def process_env() -> ProcessEnv:
    """Rank, world and rendezvous address, from torchrun's variables or else from Slurm's."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also under srun + torchrun)
        return ProcessEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # one srun task per rank
        return ProcessEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "")),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env)),
        )
    # one process on its own: a free port, so two single-process runs on a machine never meet at 29500
    return ProcessEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()))


def _slurm_port(env) -> int:
    """A port per job and per run of it: two jobs sharing a node do not collide, and a requeued
    job never meets the store of its previous run, whose ranks may still be exiting."""
    job, restart = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_RESTART_COUNT", "0"))
    return 20000 + (job * 16 + restart % 16) % 20000


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist (`node[001-008,010],gpu7` -> `node001`), expanded here:
    inside a container there is no `scontrol show hostnames`. kiln's batch scripts export
    MASTER_ADDR (the batch host's `$head_node`), so this is only the fallback."""
    if not nodelist:
        return "127.0.0.1"
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry: up to a comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    # each bracket group contributes its first value, zero padding kept
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def require_megatron_core() -> None:
    """The megatron-core this process imports is the one kiln is tested with. NGC NeMo images
    carry their own (25.11: 0.15 from source on PYTHONPATH), and package metadata can name
    another version than the module Python actually imports, so the imported module is asked."""
    import megatron.core
    from megatron.core.package_info import __version__

    if __version__ != kiln.MEGATRON_CORE:
        raise LaunchError(
            f"this environment imports megatron-core {__version__} from {Path(megatron.core.__file__).parent}; "
            f"kiln needs {kiln.MEGATRON_CORE}: run in the kiln image (docker/README.md) or "
            f"pip install megatron-core=={kiln.MEGATRON_CORE}"
        )


def init_process_group(penv: ProcessEnv, timeout_minutes: int = 30) -> torch.device:
    """Start torch.distributed once per process: NCCL on GPU, gloo on CPU. Returns the device."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(penv.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://{penv.master_addr}:{penv.master_port}",
            rank=penv.rank,
            world_size=penv.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Create megatron-core's TP/PP/DP groups (and the expert layers' EP / expert-TP / expert-DP
    groups) and seed the model-parallel RNGs."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
    )
    # must follow initialize_model_parallel: the seeds depend on this rank's TP/PP coordinates
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """megatron-core forgets its groups but destroys only its gloo data-parallel ones; each gloo group
    left keeps polling threads, so a process that builds the groups again (several runs in one
    process, a converter's checks) would gather them. Every group but the default one goes."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    for group in list(distributed_c10d._world.pg_map):  # torch keeps no public list of groups
        if group is not distributed_c10d.GroupMember.WORLD:
            torch.distributed.destroy_process_group(group)
