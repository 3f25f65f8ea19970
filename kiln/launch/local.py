"""The local executor: N processes on this machine under torchrun (PyTorch's elastic launcher)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from kiln.stages import Stage, dump_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(stage: Stage, config_path: Path, nproc: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "kiln.launch.worker", stage.name, str(config_path),
    ]


def run(stage: Stage, cfg, nproc: int, config_path: Path) -> int:
    """Write the resolved config, start `nproc` ranks, wait; returns the exit code."""
    dump_config(cfg, config_path)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = torchrun_command(stage, Path(config_path), nproc, free_port())
    return subprocess.call(command, env=env)
