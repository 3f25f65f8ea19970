"""The registry of stages: each name maps to its config class and its entry function.

The CLI, the local/Slurm/Docker launchers and the pipeline all find stages here,
so a new stage plugs in with one line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from kiln import overrides
from kiln.config import (
    ConvertConfig,
    CurateConfig,
    DPOConfig,
    ExportConfig,
    PrepareConfig,
    PretrainConfig,
    RLHFConfig,
    RMConfig,
    SFTConfig,
)


@dataclass(frozen=True)
class Stage:
    name: str
    config_cls: type
    entry: str  # "module:function" taking the config; imported lazily (megatron-core is heavy)
    distributed: bool  # runs one process per rank under torchrun/srun
    artifact: str = "output_dir"  # the config field naming the directory the stage writes
    validator: str | None = None  # "module:function(cfg, world_size)", run before any launch

    def run(self, cfg):
        return _load(self.entry)(cfg)

    def artifact_dir(self, cfg) -> str:
        return getattr(cfg, self.artifact)

    def validate(self, cfg, world_size: int) -> None:
        if self.validator:
            _load(self.validator)(cfg, world_size)


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


STAGES = {
    s.name: s
    for s in (
        Stage("curate", CurateConfig, "kiln.curation.curate:curate", distributed=False),
        Stage("prepare", PrepareConfig, "kiln.data.prepare:prepare", distributed=False),
        Stage("pretrain", PretrainConfig, "kiln.training.pretrain:pretrain", distributed=True,
              artifact="run_dir", validator="kiln.training.validate:validate"),
        Stage("sft", SFTConfig, "kiln.alignment.sft:sft", distributed=True, artifact="run_dir",
              validator="kiln.training.validate:validate"),
        Stage("dpo", DPOConfig, "kiln.alignment.dpo:dpo", distributed=True, artifact="run_dir",
              validator="kiln.training.validate:validate"),
        Stage("rm", RMConfig, "kiln.alignment.rm:rm", distributed=True, artifact="run_dir",
              validator="kiln.training.validate:validate"),
        Stage("rlhf", RLHFConfig, "kiln.alignment.rlhf:rlhf", distributed=True, artifact="run_dir",
              validator="kiln.training.validate:validate"),
        Stage("convert", ConvertConfig, "kiln.conversion.convert:convert", distributed=False, artifact="output"),
        Stage("export", ExportConfig, "kiln.export.trtllm:export", distributed=False, artifact="output"),
    )
}


def dump_config(cfg, path: str | Path) -> Path:
    from kiln.artifact import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(overrides.to_dict(cfg), sort_keys=False))
    return Path(path)


def load_config(stage: Stage, path: str | Path):
    data = yaml.safe_load(Path(path).read_text()) or {}
    return overrides.from_dict(stage.config_cls, data)
