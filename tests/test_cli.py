"""The `kiln` command end to end: dry runs, config errors, and a real 2-process tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import read_metrics, tiny_overrides


def kiln(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_dryrun_prints_layout_and_memory_and_starts_nothing(tmp_path):
    out = kiln("pretrain", "--recipe", "llama3_70b", "--dryrun", f"run_dir={tmp_path / 'r'}")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for line in ("tp: 8", "pp: 4", "vpp: 5", "dp: 2", "microbatches_per_step: 256",
                 "padded_vocab_size: 129024", "parameters: 70.554 B total"):
        assert line in text
    assert "optimizer:" in text and "activations:" in text and "total:" in text
    assert not (tmp_path / "r").exists()


def test_config_error_exits_2_with_the_fix(tmp_path):
    out = kiln("pretrain", "--recipe", "tiny", "--dryrun", "--nproc", "3", "parallel.tp=3",
               "parallel.world_size=3", "model.vocab_size=1000")
    assert out.returncode == 2
    assert "model.num_attention_heads=4 is not divisible by parallel.tp=3" in out.stderr


def test_missing_data_says_how_to_make_it(tmp_path):
    out = kiln("pretrain", "--recipe", "tiny", "--dryrun", f"data.tokenizer={tmp_path}/none")
    assert out.returncode == 2
    assert "holds no tokenizer.json: run `kiln prepare` first" in out.stderr


@pytest.mark.slow
def test_tiny_pretrain_on_two_processes(demo_data, tmp_path, nemorun_home):
    run = tmp_path / "run"
    args = tiny_overrides(demo_data, run, train__steps="12", logging__tensorboard="true",
                          logging__log_interval="4", checkpoint__save_interval="6")
    out = kiln("pretrain", "--recipe", "tiny", "--nproc", "2", *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step     12 | loss" in out.stdout
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, 13))
    assert metrics[12]["loss"] < metrics[1]["loss"] - 1.0
    assert all(k in metrics[12] for k in ("lr", "grad_norm", "tokens_per_s", "s_per_step"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000012"
    assert (run / "checkpoints" / "iter_0000006").is_dir()
    manifest = json.loads((run / "kiln.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["summary"]["steps"] == 12
    assert manifest["config"]["parallel"]["tp"] == 2
    assert {i["path"].rsplit("/", 1)[-1] for i in manifest["inputs"]} >= {
        "corpus_text_document.bin", "corpus_text_document.idx", "tokenizer.json"}
    saved = list(nemorun_home.glob("experiments/kiln-pretrain/*/pretrain.yaml"))
    assert saved and "tp: 2" in saved[-1].read_text()


@pytest.mark.slow
def test_divergence_stops_and_keeps_last_good_checkpoint(demo_data, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(demo_data, run, parallel__tp="1", train__steps="40", optimizer__lr="1e6",
                          optimizer__clip_grad="0", schedule__warmup_steps="0",
                          checkpoint__save_interval="1", checkpoint__keep_last="2")
    out = kiln("pretrain", "--recipe", "tiny", "--nproc", "1", *args)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "stopping without saving, so the last checkpoint stays the last good state" in out.stderr
    failed_step = int(out.stderr.split("step ")[1].split(":")[0])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{failed_step - 1:07d}"
    assert len(list((run / "checkpoints").glob("iter_*"))) == 2  # keep_last pruned the rest


def test_an_output_that_is_an_existing_file_is_one_line_for_every_stage(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a directory")
    corpus = "data/demo/corpus.jsonl"
    for args in (["curate", "--input", corpus, "--output", str(taken)],
                 ["prepare", "--input", corpus, "--output", str(taken)],
                 ["convert", str(tmp_path), "--to", "hf", "--output", str(taken)],
                 ["export", str(tmp_path), "--to", "trtllm", "--output", str(taken)],
                 ["export", str(tmp_path), "--to", "trtllm", "--output", str(taken / "inside")]):
        out = kiln(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
        assert f"{taken} cannot be created" in out.stderr or f"(its parent {taken} is a file)" in out.stderr, \
            out.stderr
