"""The MoE recipes: the cluster layouts validate and fit an H100 by kiln's own estimate, and the
tiny_moe pipeline runs every stage on a mixture of experts (EP=2 pretraining, SFT and DPO after an
EP reshard, HF Mixtral, TensorRT-LLM with experts split by EP, lm-eval)."""

from __future__ import annotations

import json

import pytest

from kiln.launch.config import LaunchConfig
from kiln.launch.driver import launch_pipeline
from kiln.recipes import pretrain
from kiln.recipes.pipeline import tiny_moe
from kiln.training.memory import estimate
from kiln.training.validate import validate
from kiln.validation import Check
from tests.conftest import ROOT, read_metrics

H100_GIB = 80


@pytest.mark.parametrize("recipe, total_b", [("mixtral_8x7b", 46.7), ("qwen3_30b_a3b", 30.5)])
def test_cluster_moe_recipes_validate_and_fit_an_h100(recipe, total_b):
    cfg = pretrain.RECIPES[recipe]()
    validate(cfg, Check(world_size=cfg.parallel.world_size, files="skip"))  # their data lives on the cluster
    memory = estimate(cfg, cfg.parallel.world_size, "bf16", flash_attention=True)  # TransformerEngine's
    assert memory["parameters_total"] / 1e9 == pytest.approx(total_b, rel=0.02)  # the published sizes
    assert memory["total_gib"] < 0.9 * H100_GIB, memory
    # each EP rank holds 1/EP of the experts: without EP, the same layout holds EP times as many
    ep = cfg.parallel.ep
    cfg.parallel.ep = 1
    without = estimate(cfg, cfg.parallel.world_size, "bf16", flash_attention=True)
    assert without["expert_parameters_per_rank"] == ep * memory["expert_parameters_per_rank"] > 0
    assert without["total_gib"] > memory["total_gib"] + 20


def test_lora_on_experts_is_refused_with_the_fix(demo_data):
    from kiln.errors import ConfigError
    from kiln.recipes.posttrain import sft_moe_tiny

    cfg = sft_moe_tiny()
    cfg.data.tokenizer = str(demo_data / "tokenizer")
    cfg.checkpoint.load_weights = None
    cfg.lora.enabled = True
    with pytest.raises(ConfigError, match=r"linear_fc1 and linear_fc2 are the experts' own layers.*"
                                          r"set lora.target_modules=\[linear_qkv,linear_proj\]"):
        validate(cfg, Check(world_size=1, files="skip"))
    cfg.lora.target_modules = ["linear_qkv", "linear_proj"]
    validate(cfg, Check(world_size=1, files="skip"))


@pytest.mark.slow
def test_tiny_moe_pipeline_runs_every_stage(tmp_path):
    p = tiny_moe(root=str(tmp_path / "moe"))
    p.prepare.inputs = [str(ROOT / "data/demo/corpus.jsonl")]
    p.pretrain.train.steps, p.pretrain.train.eval_interval = 10, 0
    p.pretrain.checkpoint.save_interval = 0
    p.sft.train.steps, p.sft.train.eval_interval = 4, 0
    p.dpo.train.steps, p.dpo.train.eval_interval = 3, 0
    for stage in (p.pretrain, p.sft, p.dpo):
        stage.logging.tensorboard = False
    p.eval.limit = 8
    root = tmp_path / "moe"
    lines = []
    assert launch_pipeline(p, LaunchConfig(experiments_dir=str(tmp_path / "home")), echo=lines.append) == 0, lines

    steps = read_metrics(root / "pretrain")
    assert sorted(steps) == list(range(1, 11))
    assert steps[10]["moe_load_balancing_loss"] > 0 and steps[10]["expert_imbalance"] >= 1
    t = p.pretrain.train  # every token reaches top-k experts of each MoE layer (no capacity: none dropped)
    assert all(sum(counts) == t.global_batch_size * t.seq_length * 2 for counts in steps[10]["expert_tokens"].values())
    assert steps[10]["loss"] < steps[1]["loss"]
    assert sorted(read_metrics(root / "sft")) == [1, 2, 3, 4]  # loaded the EP=2 checkpoint at EP=1
    assert sorted(read_metrics(root / "dpo")) == [1, 2, 3]
    hf = json.loads((root / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["MixtralForCausalLM"] and hf["num_local_experts"] == 4
    trt = json.loads((root / "trtllm" / "config.json").read_text())
    assert trt["moe"]["num_experts"] == 4 and trt["mapping"]["moe_ep_size"] == 2
    assert sorted(f.name for f in (root / "trtllm").glob("rank*.safetensors")) == ["rank0.safetensors",
                                                                                 "rank1.safetensors"]
    summary = json.loads((root / "eval" / "eval_summary.json").read_text())
    assert summary["metrics"], summary
