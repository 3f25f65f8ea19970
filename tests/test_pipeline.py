"""`kiln pipeline`: stages chained as one experiment; unchanged stages are skipped, a stage whose
config or input changed reruns, and so does everything after it."""

from __future__ import annotations

import shutil

import pytest

from kiln import pipeline as pl
from kiln.artifact import read_manifest
from kiln.launch.config import LaunchConfig
from kiln.launch.driver import launch_pipeline
from kiln.recipes.pipeline import tiny
from tests.conftest import ROOT, read_metrics


def make(root, corpus, steps=3):
    p = tiny(root=str(root))
    p.curate = None  # tests/curation covers it; here the chain's mechanics
    p.prepare.inputs = [str(corpus)]
    p.pretrain.parallel.tp = 1
    p.pretrain.parallel.world_size = None
    p.pretrain.train.steps = steps
    p.pretrain.train.eval_interval = 0
    p.pretrain.logging.tensorboard = False
    p.pretrain.schedule.warmup_steps = 1
    # post-training stages have their own tests (tests/alignment): here the chain's mechanics
    p.sft = p.dpo = p.rm = p.rlhf = None
    p.convert.source = f"{p.pretrain.run_dir}/checkpoints"
    p.eval = None  # tests/evaluation and the smoke pipeline run it
    return p


STAGES = ("prepare", "pretrain", "convert", "export")


def statuses(p):
    return {s.name: s.status for s in pl.plan(p)}


@pytest.mark.slow
def test_rerun_skips_fresh_stages_and_reruns_changed_ones(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(ROOT / "data/demo/corpus.jsonl", corpus)
    root, launch = tmp_path / "pipe", LaunchConfig(experiments_dir=str(tmp_path / "home"))
    lines = []

    assert launch_pipeline(make(root, corpus), launch, echo=lines.append) == 0
    assert sorted(read_metrics(root / "pretrain")) == [1, 2, 3]
    assert statuses(make(root, corpus)) == dict.fromkeys(STAGES, "fresh")
    lines.clear()
    assert launch_pipeline(make(root, corpus), launch, echo=lines.append) == 0
    assert lines[-1] == "every stage is fresh: nothing to run"

    # a pretraining change reruns pretraining only
    assert statuses(make(root, corpus, steps=4)) == {"prepare": "fresh", "pretrain": "config changed",
                                                     "convert": "upstream reruns", "export": "upstream reruns"}
    assert launch_pipeline(make(root, corpus, steps=4), launch, echo=lines.append) == 0
    assert sorted(read_metrics(root / "pretrain")) == [1, 2, 3, 4]
    assert list(tmp_path.glob("pipe/pretrain.stale-*"))  # the old run was moved aside, not mixed in

    # an input change reruns its stage and everything after it
    with open(corpus, "a") as f:
        f.write('{"text": "One more story about the kiln yard."}\n')
    assert statuses(make(root, corpus, steps=4)) == {
        "prepare": f"input changed: {corpus}", "pretrain": "upstream reruns", "convert": "upstream reruns",
        "export": "upstream reruns"}
    assert launch_pipeline(make(root, corpus, steps=4), launch, echo=lines.append) == 0
    assert statuses(make(root, corpus, steps=4)) == dict.fromkeys(STAGES, "fresh")

    table = pl.status_table(make(root, corpus, steps=4))
    held_out = read_manifest(root / "data")["summary"]["heldout"]["documents"]  # the tiny recipe sets 5 % aside
    assert 0 < held_out < 50 and f"{501 - held_out} documents (+{held_out} held out)" in table
    assert "4 steps, loss " in table and "verified, max |delta logit|" in table
    assert (root / "trtllm" / "rank1.safetensors").exists()


def test_full_tiny_pipeline_validates_and_renders(capsys):
    """Every stage of the demo pipeline, post-training included, passes validation and renders."""
    lines = []
    assert launch_pipeline(tiny(root="runs/never-written"), LaunchConfig(), dryrun=True, echo=lines.append) == 0
    ran = [line.split()[0] for line in lines if " run (" in line]
    assert ran == ["curate", "prepare", "pretrain", "sft", "dpo", "rm", "rlhf", "convert", "export", "eval"]


@pytest.mark.slow
def test_a_failing_stage_stops_the_stages_after_it(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{broken\n')
    root, lines = tmp_path / "pipe", []
    launch = LaunchConfig(experiments_dir=str(tmp_path / "home"))
    assert launch_pipeline(make(root, corpus), launch, echo=lines.append) == 1
    assert any(line.startswith("prepare failed") for line in lines), lines
    assert not (root / "pretrain").exists()


def test_every_stage_reads_its_upstreams_resolved_artifact():
    """The lineage bug: recipes spelled paths before overrides, so a pipeline run with
    pretrain.run_dir moved trained the new model and fine-tuned the old one. Links resolve after
    overrides, from the upstream stage's own config."""
    p = pl.with_overrides(tiny(root="runs/never-written"), ["pretrain.run_dir=elsewhere/pretrain",
                                                             "prepare.output_dir=elsewhere/data"])
    r = pl.resolve_links(p)
    assert r.sft.checkpoint.load_weights == "elsewhere/pretrain/checkpoints"
    assert r.pretrain.data.blend == ["elsewhere/data/corpus_text_document"]
    assert r.sft.data.tokenizer == r.rlhf.data.tokenizer == "elsewhere/data/tokenizer"
    assert r.dpo.checkpoint.load_weights == r.rm.checkpoint.load_weights == f"{r.sft.run_dir}/checkpoints"
    assert r.rlhf.rlhf.reward == f"{r.rm.run_dir}/checkpoints"
    assert r.convert.source == f"{r.rlhf.run_dir}/checkpoints" and r.export.source == r.convert.output
    assert r.eval.source == r.convert.output and r.eval.heldout == "elsewhere/data/heldout.jsonl"
    p.rlhf = p.dpo = None  # convert then reads the next stage present
    assert pl.resolve_links(p).convert.source == f"{p.sft.run_dir}/checkpoints"


def test_a_linked_field_cannot_be_overridden_while_its_upstream_runs():
    import pytest

    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sft.checkpoint.load_weights comes from the pretrain stage's output "
                                          r"\(pretrain.checkpoints\)"):
        pl.with_overrides(tiny(), ["sft.checkpoint.load_weights=runs/old/pretrain/checkpoints"])
