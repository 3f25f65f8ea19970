"""Every validation rule fails before anything starts, with the field, the values and a fix."""

from __future__ import annotations

import pytest

from kiln import overrides
from kiln.errors import ConfigError
from kiln.recipes.pretrain import tiny
from kiln.training.validate import validate
from kiln.validation import Check


def check(world: int, **fields):
    cfg = tiny()
    cfg.model.vocab_size = 1000
    cfg.parallel.world_size = None
    overrides.apply(cfg, {k.replace("__", "."): v for k, v in fields.items()})
    validate(cfg, Check(world_size=world, files="skip"))  # the layout rules, without the demo data


def test_tiny_recipe_is_valid():
    check(2)


@pytest.mark.parametrize("world, fields, message", [
    (6, {"parallel__tp": 4},
     "world size 6 is not divisible by parallel.tp x parallel.pp = 4 x 1 = 4: launch a multiple of 4 "
     "processes (--nproc, or tasks x nodes under Slurm), or change parallel.tp / parallel.pp"),
    (4, {"parallel__world_size": 8},
     "parallel.world_size=8 but 4 processes were launched: launch 8 (--nproc, or nodes x tasks per "
     "node), or set parallel.world_size=null"),
    (3, {"parallel__tp": 3},
     "model.num_attention_heads=4 is not divisible by parallel.tp=3: pick a TP size among 1, 2, 4"),
    (4, {"parallel__tp": 4},
     "model.num_query_groups=2 (KV heads) is not divisible by parallel.tp=4: pick a TP size among 1, 2"),
    (1, {"parallel__tp": 1, "model__num_attention_heads": 6, "model__num_query_groups": 4},
     "model.num_attention_heads=6 is not a multiple of model.num_query_groups=4: each KV head must "
     "serve a whole group of query heads"),
    (3, {"parallel__tp": 1, "parallel__pp": 3},
     "model.num_layers=4 is not divisible by parallel.pp x parallel.vpp = 3 x 1 = 3: use a layer "
     "count that is a multiple of 3, or another pipeline split"),
    (2, {"parallel__tp": 1, "parallel__pp": 2, "parallel__vpp": 4},
     "model.num_layers=4 is not divisible by parallel.pp x parallel.vpp = 2 x 4 = 8: use a layer "
     "count that is a multiple of 8, or another pipeline split"),
    (2, {"parallel__tp": 1, "train__global_batch_size": 12},
     "train.global_batch_size=12 is not divisible by train.micro_batch_size x DP = 4 x 2 = 8: set it "
     "to a multiple of 8, e.g. 8"),
    (2, {"train__seq_length": 512},
     "train.seq_length=512 exceeds model.max_position_embeddings=256: shorten train.seq_length or "
     "raise model.max_position_embeddings"),
    (2, {"model__make_vocab_size_divisible_by": 100},
     "model.make_vocab_size_divisible_by=100 must be a positive multiple of 128, so each TP shard of "
     "the embedding stays aligned: use 128"),
    (1, {"parallel__tp": 1, "parallel__sequence_parallel": True},
     "parallel.sequence_parallel=true needs parallel.tp >= 2: it splits activations across the TP "
     "group, so set parallel.tp or turn sequence_parallel off"),
    (2, {"parallel__tp": 1, "parallel__vpp": 2},
     "parallel.vpp=2 needs parallel.pp >= 2: interleaving splits a pipeline stage, so unset "
     "parallel.vpp or raise parallel.pp"),
    (2, {"schedule__warmup_steps": 100},
     "schedule.warmup_steps=100 must be below the decay length 60 (schedule.decay_steps, or "
     "train.steps when unset): shorten the warmup or train longer"),
    (2, {"data__blend": []},
     "data.blend is empty: give an indexed dataset prefix (the path without .bin/.idx), e.g. "
     "data.blend=[data/corpus_text_document], made by `kiln prepare`"),
])
def test_rule_message(world, fields, message):
    with pytest.raises(ConfigError) as err:
        check(world, **fields)
    assert message in str(err.value).splitlines() or f"  - {message}" in str(err.value).splitlines()


def test_missing_vocab_is_named():
    cfg = tiny()
    cfg.model.vocab_size = None
    cfg.data.tokenizer = None
    with pytest.raises(ConfigError, match="model.vocab_size is unset and no tokenizer gives it"):
        validate(cfg, 2)


@pytest.mark.parametrize("tp, expected", [(1, 1024), (2, 1024), (4, 1024), (8, 1024), (16, 2048)])
def test_vocab_is_padded_to_128_times_tp(tp, expected):
    cfg = tiny()
    cfg.model.vocab_size = 1000
    cfg.model.make_vocab_size_divisible_by = 128  # the tiny preset uses 256 (same rows at TP 1/2/4)
    assert cfg.model.padded_vocab_size(tp) == expected
    assert cfg.model.padded_vocab_size(tp) % (128 * tp) == 0


def test_llama3_vocab_padding_for_tp8():
    from kiln.recipes.pretrain import llama3_70b

    assert llama3_70b().model.padded_vocab_size(8) == 129024  # 128256 rounded up to 1024


@pytest.mark.parametrize("recipe", ["gpt2_124m", "llama3_8b", "llama3_70b"])
def test_cluster_recipes_validate_on_their_world_size(recipe):
    from kiln.recipes.pretrain import RECIPES

    cfg = RECIPES[recipe]()
    validate(cfg, Check(world_size=cfg.parallel.world_size, files="skip"))  # their data lives on the cluster


def test_every_broken_rule_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        check(2, parallel__tp=3, optimizer__lr=1e-3)
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems in the training config:"
    assert any("world size 2 is not divisible by parallel.tp x parallel.pp = 3 x 1 = 3" in line for line in lines)
    assert any("model.num_attention_heads=4 is not divisible by parallel.tp=3" in line for line in lines)
    assert any("model.num_query_groups=2 (KV heads) is not divisible by parallel.tp=3" in line for line in lines)


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.lr", -1, "optimizer.lr=-1.0 must be > 0"),
    ("optimizer.beta2", 1.0, "optimizer.beta2=1.0 must be in [0, 1)"),
    ("optimizer.eps", 0, "optimizer.eps=0.0 must be > 0"),
    ("optimizer.weight_decay", -0.1, "optimizer.weight_decay=-0.1 must be >= 0"),
    ("optimizer.clip_grad", -1, "optimizer.clip_grad=-1.0 must be >= 0"),
    ("model.hidden_dropout", 1.0, "model.hidden_dropout=1.0 must be in [0, 1)"),
    ("model.norm_epsilon", 0, "model.norm_epsilon=0.0 must be > 0"),
    ("train.eval_interval", -5, "train.eval_interval=-5 must be >= 0"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last=0 must be >= 1"),
    ("logging.loss_spike_factor", -2, "logging.loss_spike_factor=-2.0 must be >= 0"),
])
def test_numeric_fields_are_range_checked(field, value, message):
    with pytest.raises(ConfigError) as err:
        check(2, **{field.replace(".", "__"): value})
    assert message in str(err.value)


def test_other_stages_fields_are_range_checked_too(tmp_path):
    from kiln.config import CurateConfig, DPOConfig, RLHFConfig
    from kiln.validation import Problems, check_ranges

    for cfg, field, value in ((CurateConfig(), "jaccard_threshold", 1.0), (DPOConfig(), "dpo.beta", 0),
                              (RLHFConfig(), "rlhf.generation.top_p", 0), (RLHFConfig(), "rlhf.gamma", 1.5)):
        overrides.apply(cfg, {field: value})
        problems = Problems()
        check_ranges(cfg, problems)
        assert problems.lines and problems.lines[0].startswith(f"{field}="), (field, problems.lines)


def test_weights_of_another_shape_are_named_before_anything_starts(tmp_path):
    """sft with a model.hidden_size unlike the checkpoint's: one line from the checkpoint's metadata
    (which tensor, both shapes, the fields it was saved with), no process group, no traceback."""
    import subprocess
    import sys

    from kiln.config import ConvertConfig
    from kiln.conversion.convert import convert
    from tests.conversion.models import build

    hf = build("llama", tmp_path / "hf")
    convert(ConvertConfig(source=str(hf), output=str(tmp_path / "meg"), to="megatron", verify=False))
    weights = tmp_path / "meg" / "checkpoints"
    model = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.num_query_groups=2",
             "model.ffn_hidden_size=160", "model.vocab_size=1000", "model.make_vocab_size_divisible_by=128"]
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "sft", "--recipe", "tiny",
                          f"checkpoint.load_weights={weights}", f"run_dir={tmp_path / 'run'}", *model],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert ("tensor decoder.layers.self_attention.linear_qkv.weight is [2, 128, 64] in iter_0000000 but this model "
            "makes it [2, 256, 128]; the checkpoint was saved with model.hidden_size=64") in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
