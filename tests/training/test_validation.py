"""Validation during training: per-source losses of a blend and their weighted total, a step-0
round, and eval-only runs (train.steps=0) that reproduce a training run's numbers exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import overrides
from kiln.data.gpt_dataset import source_names
from kiln.errors import ConfigError
from kiln.recipes.posttrain import rlhf_tiny, sft_tiny
from kiln.recipes.pretrain import tiny
from kiln.training.validate import validate
from kiln.validation import Check
from tests.conftest import ROOT, free_port, launch, read_metrics, tiny_overrides

WEIGHTS = (0.3, 0.7)


def test_source_names_come_from_prefix_basenames_and_stay_unique():
    prefixes = ["a/web_text_document", "b/web_text_document", "c/code", "d/web_2_text_document"]
    assert source_names(prefixes) == ["web", "web_2", "code", "web_2_2"]


def _check(cfg, **fields) -> None:
    cfg.model.vocab_size = 1000
    cfg.parallel.world_size = None
    overrides.apply(cfg, {k.replace("__", "."): v for k, v in fields.items()})
    validate(cfg, Check(world_size=1, files="skip"))


def test_eval_only_needs_no_schedule_but_a_checkpoint(tmp_path):
    _check(tiny(), run_dir=str(tmp_path / "eval"), train__steps=0, parallel__tp=1, checkpoint__load_weights="/ckpt")
    with pytest.raises(ConfigError, match=r"\(eval-only\) scores a checkpoint: set checkpoint.load_weights"):
        _check(tiny(), run_dir=str(tmp_path / "eval"), train__steps=0, parallel__tp=1)


@pytest.mark.parametrize("cfg, fields, message", [
    (tiny, {"data__split": "100,0,0"}, "data.split='100,0,0' gives it no weight: use e.g. data.split=98,2,0"),
    (sft_tiny, {"data__valid": None}, "data.valid is unset: give data.valid=<JSONL file>"),
    (rlhf_tiny, {}, "rlhf has no validation data to score; use train.steps >= 1"),
])
def test_eval_only_needs_validation_data(tmp_path, cfg, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _check(cfg(), run_dir=str(tmp_path / "eval"), train__steps=0, parallel__tp=1,
               checkpoint__load_weights="/ckpt", **fields)


def test_eval_only_keeps_a_training_runs_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ConfigError, match=f"run_dir={tmp_path} holds a training run"):
        _check(tiny(), run_dir=str(tmp_path), train__steps=0, parallel__tp=1, checkpoint__load_weights="/ckpt")
    (tmp_path / "kiln.json").write_text(json.dumps({"summary": {"eval_only": True}}))
    _check(tiny(), run_dir=str(tmp_path), train__steps=0, parallel__tp=1, checkpoint__load_weights="/ckpt")


def test_eval_only_dryrun_counts_no_optimizer_state():
    from kiln.training.memory import estimate

    cfg = tiny()
    cfg.model.vocab_size = 1000
    assert estimate(cfg, 2, "fp32", False)["optimizer_gib"] > 0
    cfg.train.steps = 0
    assert estimate(cfg, 2, "fp32", False)["optimizer_gib"] == 0


@pytest.fixture(scope="module")
def sources(demo_data, tmp_path_factory) -> list[str]:
    """Two blend sources: the demo corpus's halves, tokenized with the demo tokenizer."""
    from kiln.config import PrepareConfig
    from kiln.data.prepare import prepare

    root = tmp_path_factory.mktemp("sources")
    lines = (ROOT / "data/demo/corpus.jsonl").read_text().splitlines(keepends=True)
    prefixes = []
    for name, part in (("first", lines[: len(lines) // 2]), ("second", lines[len(lines) // 2:])):
        (root / f"{name}.jsonl").write_text("".join(part))
        prepare(PrepareConfig(inputs=[str(root / f"{name}.jsonl")], output_dir=str(root / name), name=name,
                              tokenizer=str(demo_data / "tokenizer")))
        prefixes.append(str(root / name / f"{name}_text_document"))
    return prefixes


@pytest.fixture(scope="module")
def tp2_runs(demo_data, sources, tmp_path_factory) -> Path:
    """Under TP=2: a blend trained 4 steps (validating at 0, 2, 4; saving at 2 and 4), then eval-only
    runs of the blend at step 2, of its first source alone at step 2, and of the run directory."""
    runs = tmp_path_factory.mktemp("validation")
    blend = f"[{WEIGHTS[0]}, {sources[0]}, {WEIGHTS[1]}, {sources[1]}]"
    common = {"data__blend": blend, "train__eval_steps": "2", "parallel__tp": "2"}
    step2 = runs / "train" / "checkpoints" / "iter_0000002"
    launch(2, [
        tiny_overrides(demo_data, runs / "train", **common, train__steps="4", train__eval_interval="2",
                       checkpoint__save_interval="2", logging__tensorboard="true"),
        tiny_overrides(demo_data, runs / "eval_blend", **common, train__steps="0", checkpoint__load_weights=str(step2)),
        tiny_overrides(demo_data, runs / "eval_first", **{**common, "data__blend": f"[{sources[0]}]"},
                       train__steps="0", checkpoint__load_weights=str(step2)),
        tiny_overrides(demo_data, runs / "eval_latest", **common, train__steps="0",
                       checkpoint__load_weights=str(runs / "train")),
    ])
    return runs


@pytest.mark.slow
def test_blend_reports_each_source_and_the_weighted_total(tp2_runs):
    metrics = read_metrics(tp2_runs / "train")
    assert sorted(metrics) == [0, 1, 2, 3, 4]
    assert set(metrics[0]) == {"step", "val_loss", "val_loss/first", "val_loss/second"}  # before any step
    for step in (0, 2, 4):
        record = metrics[step]
        total = WEIGHTS[0] * record["val_loss/first"] + WEIGHTS[1] * record["val_loss/second"]
        assert record["val_loss"] == pytest.approx(total, abs=1e-9)
        assert record["val_loss/first"] != record["val_loss/second"]
    assert metrics[4]["val_loss"] < metrics[0]["val_loss"]  # validation sees the training
    assert "val_loss/first" not in metrics[3] and "loss" in metrics[3]
    summary = json.loads((tp2_runs / "train" / "kiln.json").read_text())["summary"]
    assert summary["validation"] == {k: v for k, v in metrics[4].items() if k.startswith("val_")} | {"step": 4}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tp2_runs / "train" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss/second")] == [0, 2, 4]


@pytest.mark.slow
def test_eval_only_reproduces_the_training_runs_validation_exactly(tp2_runs):
    """Eval-only reads the same held-out samples as every training round: at the checkpoint of
    step N it gives the losses the training run logged at step N, per source and in total."""
    trained = read_metrics(tp2_runs / "train")
    for run, step in (("eval_blend", 2), ("eval_latest", 4)):
        (record,) = read_metrics(tp2_runs / run).values()
        assert record["step"] == step
        for key in ("val_loss", "val_loss/first", "val_loss/second"):
            assert abs(record[key] - trained[step][key]) < 1e-6, (run, key)
        summary = json.loads((tp2_runs / run / "kiln.json").read_text())["summary"]
        assert summary["eval_only"] is True and summary["steps"] == step
        assert summary["validation"]["val_loss"] == record["val_loss"]
        assert summary["checkpoint"].endswith(f"iter_{step:07d}")
        assert not (tp2_runs / run / "checkpoints").exists()  # scoring writes no checkpoint


@pytest.mark.slow
def test_a_source_scores_the_same_in_a_blend_as_alone(tp2_runs):
    alone = read_metrics(tp2_runs / "eval_first")[2]
    assert set(alone) == {"step", "val_loss"}  # one source: its loss is the total
    assert abs(alone["val_loss"] - read_metrics(tp2_runs / "eval_blend")[2]["val_loss/first"]) < 1e-6
    assert abs(alone["val_loss"] - read_metrics(tp2_runs / "train")[2]["val_loss/first"]) < 1e-6


def _sft(run_dir: Path, demo_data: Path, base: Path, *extra: str) -> dict[int, dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "kiln.cli", "sft", "--recipe", "tiny", f"run_dir={run_dir}",
           f"checkpoint.load_weights={base}", f"data.tokenizer={demo_data / 'tokenizer'}", "parallel.world_size=null",
           "logging.tensorboard=false", "logging.progress_bar=false", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return read_metrics(run_dir)


@pytest.mark.slow
def test_sft_validates_at_step_0_and_eval_only_gives_the_same_loss(tp2_runs, demo_data, tmp_path):
    base = tp2_runs / "train" / "checkpoints" / "iter_0000002"
    trained = _sft(tmp_path / "sft", demo_data, base, "train.steps=2", "train.eval_interval=2",
                   "schedule.warmup_steps=1")
    assert set(trained[0]) == {"step", "val_loss"} and "loss" in trained[1]
    scored = _sft(tmp_path / "sft_eval", demo_data, base, "train.steps=0")
    assert list(scored) == [2]  # the base checkpoint's step
    assert abs(scored[2]["val_loss"] - trained[0]["val_loss"]) < 1e-6
