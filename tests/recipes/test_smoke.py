"""CI smoke recipes: `kiln pipeline run smoke` runs every stage (pretraining as TP=2 on two CPU
processes here, world size 1 on one GPU), and each training stage must reproduce its reference loss
curve, so a change that moves the numerics fails CI even when every parity check still agrees with
itself. Regenerate after an intended numerical change with KILN_UPDATE_GOLDEN=1."""

from __future__ import annotations

import json

import pytest

from kiln.launch.config import LaunchConfig
from kiln.launch.driver import launch_pipeline
from kiln.recipes.pipeline import smoke
from tests.conftest import check_loss_curve, read_metrics

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

TOLERANCE = 2e-3  # fp32 on CPU; covers BLAS differences between x86 CPUs, not a changed model
# the reward model's grad norm jumps ~7x at step 5 and amplifies upstream rounding: measured on two x86
# machines, the same code gave pretraining curves 8e-7 apart and reward-model curves 3.4e-3 apart
TOLERANCES = {"rm": 6e-3}


def test_smoke_pipeline_reproduces_every_stages_reference_curve(tmp_path):
    pipeline = smoke(root=str(tmp_path / "smoke"))
    for _, cfg in pipeline.stages():
        if hasattr(cfg, "logging"):
            cfg.logging.tensorboard = False
            cfg.logging.progress_bar = False
    lines = []
    assert launch_pipeline(pipeline, LaunchConfig(experiments_dir=str(tmp_path / "home")), echo=lines.append) == 0, \
        "\n".join(lines[-30:])
    assert pipeline.pretrain.parallel.tp == 2  # two CPU processes here (one GPU: world size 1)
    for stage in ("pretrain", "sft", "dpo", "rm", "rlhf"):
        metrics = read_metrics(tmp_path / "smoke" / stage)
        check_loss_curve(f"{stage}_smoke", metrics, TOLERANCES.get(stage, TOLERANCE))
    pretrain = read_metrics(tmp_path / "smoke" / "pretrain")
    assert pretrain[20]["loss"] < pretrain[1]["loss"] - 2.0
    assert (tmp_path / "smoke" / "trtllm" / "rank0.safetensors").exists()
    scores = json.loads((tmp_path / "smoke" / "eval" / "eval_summary.json").read_text())["metrics"]
    assert scores["kiln_demo_choice"]["acc"]["value"] > 0.5  # above chance (0.25) after the smoke run
