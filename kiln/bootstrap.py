"""What every kiln process does first, whether started by the CLI or launched as a rank.

Library warnings are quieted (megatron-core and torch warn at import about optional GPU
packages; the README says it once), secrets mounted by the Docker launcher are exported, and
the working directory the job was submitted from is restored, so relative paths in a config
mean on a rank what they meant where it was written.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_QUIET = (
    ".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
    ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*is deprecated.*", ".*cuda_graph_scope.*",
    ".*TypedStorage is deprecated.*", ".*Please use `torch.distributed.*",
)


def quiet_library_warnings() -> None:
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


def load_secrets_file() -> None:
    """In a container: export the secrets the Docker launcher mounted (KILN_SECRETS_FILE)."""
    path = os.environ.get("KILN_SECRETS_FILE")
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition("=")
            os.environ.setdefault(name, value)


def interactive(stream=None) -> bool:
    """Whether a person watches this stream, so a live progress bar helps rather than litters.
    A batch job's task can have a terminal too: NeMo-Run sets SLURM_UNBUFFEREDIO, and srun then
    runs tasks on a pseudo-terminal whose output lands in the job's log file. So Slurm tasks get
    plain log lines (logging.progress_bar=true still forces the bar)."""
    stream = stream or sys.stdout
    return stream.isatty() and "SLURM_JOB_ID" not in os.environ and os.environ.get("TERM") != "dumb"


def start_process() -> None:
    """The CLI's start."""
    quiet_library_warnings()


def start_rank() -> None:
    """A launched rank's start (NeMo-Run task, torchrun or srun). The kiln this rank imported
    (shipped into the job's code directory, which `python -m` put on sys.path) is put on
    PYTHONPATH too, so processes it starts import the same code from any directory."""
    quiet_library_warnings()
    load_secrets_file()
    source = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if source not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([source, *paths])
    if os.environ.get("KILN_WORKDIR"):
        os.chdir(os.environ["KILN_WORKDIR"])
