"""Stages as NeMo-Run tasks: a stage config becomes a `run.Partial` of `run_stage`.

`run.Config` mirrors the dataclass tree field by field, so NeMo-Run serializes it into the
experiment directory and rebuilds the very same typed config on each rank.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from kiln.stages import STAGES, Stage


def stage_for(cfg) -> Stage:
    for stage in STAGES.values():
        if type(cfg) is stage.config_cls:  # exact: SFTConfig is also a PretrainConfig
            return stage
    raise TypeError(f"{type(cfg).__name__} is not the config of any kiln stage")


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


def to_partial(cfg):
    """`run.Partial(run_stage, cfg=...)`: give it to run.run or add it to a run.Experiment."""
    import nemo_run as run

    stage_for(cfg)  # fail here, not on the cluster, for a config no stage takes
    return run.Partial(run_stage, cfg=to_run_config(cfg))


def run_stage(cfg):
    """What every launched rank runs. A stage stopped by preemption exits EXIT_PREEMPTED after
    rank 0 has asked Slurm to run the job again (requeue, or a dependent resubmission)."""
    from kiln.cli import quiet_library_warnings
    from kiln.launch.executors import load_secrets_file
    from kiln.training.preemption import EXIT_PREEMPTED

    quiet_library_warnings()
    load_secrets_file()
    if os.environ.get("KILN_WORKDIR"):
        os.chdir(os.environ["KILN_WORKDIR"])
    result = stage_for(cfg).run(cfg)
    if isinstance(result, dict) and "preempted_at" in result:
        if "SLURM_JOB_ID" in os.environ and _rank() == 0:
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


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
