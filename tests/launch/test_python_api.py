"""kiln recipes as NeMo-Run tasks from Python: run.run and run.Experiment, as a user writes them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nemo_run as run
import pytest

from kiln import overrides
from kiln.config import PrepareConfig
from kiln.launch import submit, to_partial
from kiln.launch.config import LaunchConfig
from kiln.recipes.pretrain import tiny
from kiln.validation import Check
from tests.conftest import ROOT, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

SECRET = "hf_never_written_0123456789"
CORPUS = ROOT / "data" / "demo" / "corpus.jsonl"


def local_executor(nproc: int = 1):
    # NeMo-Run starts `python` from PATH: this interpreter first
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    return run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun" if nproc > 1 else None, env_vars=env)


def test_run_run_with_a_recipe_partial(demo_data, tmp_path):
    cfg = tiny()
    overrides.apply(cfg, tiny_overrides(demo_data, tmp_path / "run", parallel__tp="1", train__steps="4"))
    executor = local_executor()
    run.run(to_partial(cfg, executor), executor=executor, name="tiny")
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2, 3, 4]


def test_experiment_chains_prepare_and_pretrain(tmp_path):
    data = tmp_path / "data"
    prepare = PrepareConfig(inputs=[str(CORPUS)], output_dir=str(data), vocab_size=512)
    cfg = tiny()
    overrides.apply(cfg, tiny_overrides(data, tmp_path / "run", parallel__tp="2", train__steps="3"))
    with run.Experiment("kiln-api-test", enable_goodbye_message=False) as exp:
        # pretrain's data does not exist yet: prepare writes it, and the ranks validate it again
        exp.add(to_partial(prepare, local_executor()), executor=local_executor(), name="prepare")
        exp.add(to_partial(cfg, local_executor(2), Check(files="skip")), executor=local_executor(2), name="pretrain")
        exp.run(sequential=True)
    assert [job.state.name for job in exp.jobs] == ["SUCCEEDED", "SUCCEEDED"]
    assert json.loads((tmp_path / "run" / "kiln.json").read_text())["config"]["model"]["vocab_size"] > 0


def test_secrets_are_in_no_file_or_log(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "data"
    prepare = PrepareConfig(inputs=[str(CORPUS)], output_dir=str(out), vocab_size=300)
    launch = LaunchConfig(executor="local", experiments_dir=str(tmp_path / "home"))
    result = submit.submit("kiln-secret-test", [submit.Task("prepare", prepare, 1)], launch)
    assert result.ok
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 5
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
