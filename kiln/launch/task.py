"""What runs on a launched rank: `run_stage(cfg)`, the function every NeMo-Run task calls.

`run.Config` mirrors the dataclass tree field by field, so NeMo-Run serializes it into the
experiment directory and rebuilds the very same typed config on each rank.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from kiln import bootstrap
from kiln.errors import KilnError
from kiln.stages import stage_for


def to_run_config(obj):
    import nemo_run as run

    if dataclasses.is_dataclass(obj):
        fields = {f.name: to_run_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return run.Config(type(obj), **fields)
    if isinstance(obj, (list, tuple)):
        return [to_run_config(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_run_config(v) for k, v in obj.items()}
    return obj


def run_stage(cfg):
    """What every launched rank runs. A KilnError is printed once, as one line (by rank 0), and
    ends the process with its exit code instead of a traceback from every rank."""
    bootstrap.start_rank()
    try:
        return execute(cfg)
    except KilnError as exc:
        if rank() == 0:
            print(f"kiln: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exc.exit_code)  # no interpreter teardown: peers may still hold collectives open


def execute(cfg):
    """Run the stage in this process. One stopped by preemption exits EXIT_PREEMPTED after rank 0
    has asked Slurm to run the job again (requeue, or a dependent resubmission)."""
    from kiln.training.preemption import EXIT_PREEMPTED

    result = stage_for(cfg).run(cfg)
    if isinstance(result, dict) and "preempted_at" in result:
        if "SLURM_JOB_ID" in os.environ and rank() == 0:
            from kiln.launch.slurm import after_preemption

            after_preemption()
        _barrier()  # no rank exits (and trips srun's kill-on-bad-exit) before the requeue is done
        sys.stdout.flush()
        sys.exit(EXIT_PREEMPTED)
    return result


def _barrier() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
