"""Experiment trackers: offline W&B and a local MLflow store fed by a tiny pretraining on two ranks.
What each library reads back equals metrics.jsonl step by step; a resumed run continues the same
tracker runs; only rank 0 logs; the W&B key, present in the job's environment, is written nowhere."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from kiln import overrides
from kiln.config import PretrainConfig
from kiln.errors import ConfigError
from kiln.training import trackers
from kiln.training.validate import validate
from tests.conftest import launch, tiny_overrides

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

SECRET = "kiln-test-secret-7d1f0c9a5be24c6e8a31f4d2b90e6c57a1d3f8e2"  # a fake WANDB_API_KEY
TRACKED = {"logging__wandb__mode": "offline", "logging__wandb__tags": "[tiny, test]",
           "logging__mlflow__experiment": "tiny"}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> Path:
    """One launch of 2 ranks, the key in the environment: `full` (6 steps, validation on two sources at
    0, 3, 6), then `split`: 3 steps, a checkpoint and a stop, then a resume to step 6 that knows
    nothing of the first part but what its run directory holds (as a requeued Slurm job)."""
    root = tmp_path_factory.mktemp("trackers")
    prefix = demo_data / "corpus_text_document"
    full = tiny_overrides(demo_data, root / "full", **TRACKED, train__steps="6", train__eval_interval="3",
                          train__eval_steps="1", data__blend=f"[0.5, {prefix}, 0.5, {prefix}]")

    def split(**extra):
        return tiny_overrides(demo_data, root / "split", **TRACKED, train__steps="6", checkpoint__save_interval="3",
                              **extra)

    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_API_KEY", SECRET)  # as launch.secrets brings it into a Slurm or Docker task
        out = launch(2, [full, split(train__stop_after_steps="3"), split(checkpoint__resume="true")])
    (root / "launch.out").write_text(out)  # what the ranks printed: searched for the key too
    return root


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as series: key -> [(step, value)] in the order logged."""
    series: dict[str, list] = {}
    for record in jsonl(run_dir):
        step = record.pop("step")
        for key, value in trackers.flatten(record).items():
            series.setdefault(key, []).append((step, value))
    return series


def wandb_records(path: Path):
    """The records of a .wandb file, decoded with wandb's own protobuf schema. The file is a W&B
    header (":W&B", magic, version: 7 bytes) and then a LevelDB log: 32 KiB blocks of chunks, each
    crc32c (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if (32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(wandb_dir: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]], dict]:
    """(run ids, key -> [(step, value)] over every offline file of the run in start order, config)."""
    ids, series, config = set(), {}, {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for key, value in row.items():
                    if key != "step" and not key.startswith("_"):
                        series.setdefault(key, []).append((row["step"], value))
    return ids, series, config


def mlflow_history(run_dir: Path, keys) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trackers.local_mlflow_uri(str(run_dir)))
    found = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    state = json.loads((run_dir / trackers.STATE).read_text())["mlflow"]
    history = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(state["run_id"], k),
                                                     key=lambda m: (m.timestamp, m.step))] for k in keys}
    return found, history


@pytest.mark.slow
def test_wandb_logs_exactly_what_metrics_jsonl_has(runs):
    root = runs
    want = expected(root / "full")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_loss/corpus", "val_loss/corpus_2"} <= set(want)
    assert [s for s, _ in want["val_loss/corpus_2"]] == [0, 3, 6]
    ids, got, config = wandb_history(root / "full")
    state = json.loads((root / "full" / trackers.STATE).read_text())["wandb"]
    assert ids == {state["id"]}  # one run: rank 1 opened none
    assert {k: v for k, v in got.items() if not k.startswith("summary/")} == want
    manifest = json.loads((root / "full" / "kiln.json").read_text())
    assert config["model"] == manifest["config"]["model"] and config["train"]["steps"] == 6
    lineage = config["lineage"]
    assert lineage["stage"] == "pretrain" and {"corpus_text_document.bin", "tokenizer.json"} <= set(lineage["inputs"])
    assert len(list((root / "full").glob("wandb/offline-run-*/files/kiln.json"))) == 1


@pytest.mark.slow
def test_mlflow_logs_exactly_what_metrics_jsonl_has(runs):
    root = runs
    want = expected(root / "full")
    found, got = mlflow_history(root / "full", want)
    assert len(found) == 1  # rank 1 opened no run
    assert got == want
    run = found[0]
    hidden = json.loads((root / "full" / "kiln.json").read_text())["config"]["model"]["hidden_size"]
    assert run.data.params["model.hidden_size"] == str(hidden) and run.data.tags["lineage.stage"] == "pretrain"
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_resumed_run_continues_the_same_tracker_runs(runs):
    run_dir = runs / "split"
    want = expected(run_dir)
    assert [s for s, _ in want["loss"]] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "iter_0000003").is_dir()  # the first part really stopped there
    state = json.loads((run_dir / trackers.STATE).read_text())
    ids, got, _ = wandb_history(run_dir)
    # the first part, the resumed part and the manifest: three files, one W&B run
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 3 and ids == {state["wandb"]["id"]}
    assert {k: v for k, v in got.items() if not k.startswith("summary/")} == want
    found, history = mlflow_history(run_dir, want)
    assert [r.info.run_id for r in found] == [state["mlflow"]["run_id"]] and history == want


@pytest.mark.slow
def test_no_secret_in_any_file(runs):
    root = runs
    files = [p for p in root.rglob("*") if p.is_file()]  # wandb's links to its core log included
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "mlflow.db" for p in files)
    assert "loss" in (root / "launch.out").read_text()
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_eval_results_reach_the_tracked_run(runs, tmp_path):
    """kiln eval's summary, for a checkpoint of a tracked run, lands in that run's trackers."""
    root = runs
    checkpoint = root / "full" / "checkpoints" / "iter_0000006"
    summary = {"artifact": {"kind": "megatron", "path": str(checkpoint), "step": 6},
               "metrics": {"heldout": {"bits_per_byte": {"value": 2.5, "stderr": 0.1, "higher_is_better": False}}}}
    (tmp_path / "eval_summary.json").write_text(json.dumps(summary))
    assert trackers.log_eval(summary, tmp_path) == root / "full"
    _, got, config = wandb_history(root / "full")
    assert got["eval/heldout/bits_per_byte"] == [(6, 2.5)] and config["eval"]["output"] == str(tmp_path)
    _, history = mlflow_history(root / "full", ["eval/heldout/bits_per_byte"])
    assert history["eval/heldout/bits_per_byte"] == [(6, 2.5)]


def test_a_tracker_not_installed_fails_validation(monkeypatch, tmp_path):
    cfg = PretrainConfig(run_dir=str(tmp_path / "run"))
    overrides.apply(cfg, ["data.mock=true", "model.vocab_size=256", "logging.wandb={}", "logging.mlflow={}"])
    validate(cfg, 1)  # installed: fine
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the extra looks like
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError) as error:
        validate(cfg, 1)
    assert "logging.wandb is set but the wandb package is not installed: pip install 'kiln[track]'" in str(error.value)
    assert "logging.mlflow is set but the mlflow package is not installed" in str(error.value)


def test_wandb_goes_offline_without_a_key(monkeypatch):
    from kiln.config import WandbConfig

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert trackers.wandb_mode(WandbConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.wandb_mode(WandbConfig()) == "online"
    assert trackers.wandb_mode(WandbConfig(mode="offline")) == "offline"


def test_flatten_keeps_numbers_and_spreads_per_expert_lists():
    record = {"loss": 2.0, "grad_norm": None, "expert_load": [0.5, 0.25], "moe": {"aux": 1}, "note": "x"}
    assert trackers.flatten(record) == {"loss": 2.0, "expert_load/0": 0.5, "expert_load/1": 0.25, "moe/aux": 1.0}


def test_online_wandb_without_a_key_fails_validation(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = PretrainConfig(run_dir=str(tmp_path / "run"))
    overrides.apply(cfg, ["data.mock=true", "model.vocab_size=256", "logging.wandb.mode=online"])
    with pytest.raises(ConfigError, match="logging.wandb.mode=online but WANDB_API_KEY is not set"):
        validate(cfg, 1)
    assert os.environ.get("WANDB_API_KEY") is None


def test_a_long_config_value_fits_mlflow(tmp_path):
    """A param over MLflow's 6000 characters (a long blend) would refuse the run: it is cut there,
    and config.json keeps it whole."""
    from mlflow.tracking import MlflowClient

    from kiln.config import MLflowConfig

    blend = [f"/data/source_{i}_text_document" for i in range(300)]
    run = trackers.MLflowRun(MLflowConfig(), str(tmp_path), None, {"data": {"blend": blend}})
    run.close()
    client = MlflowClient(run.uri)
    assert len(client.get_run(run.run_id).data.params["data.blend"]) == 6000
    whole = client.download_artifacts(run.run_id, "config.json", str(tmp_path / "back"))
    assert json.loads(Path(whole).read_text())["data"]["blend"] == blend


def test_eval_finds_the_training_run_through_the_lineage(tmp_path):
    """A checkpoint of a tracked run, and an export of a conversion of it (each kiln.json naming its
    input), lead back to that run; a model with no tracked run leads nowhere."""
    run = tmp_path / "pretrain"
    checkpoint = run / "checkpoints" / "iter_0000006"
    checkpoint.mkdir(parents=True)
    (run / trackers.STATE).write_text("{}")
    for name, source in (("hf", checkpoint), ("trtllm", tmp_path / "hf")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kiln.json").write_text(json.dumps({"inputs": [{"path": str(source), "digest": "x"}]}))
    assert trackers.find_run(checkpoint) == run and trackers.find_run(run / "checkpoints") == run
    assert trackers.find_run(tmp_path / "trtllm") == run
    (run / trackers.STATE).unlink()
    assert trackers.find_run(tmp_path / "trtllm") is None


def test_a_tracker_failing_after_the_stage_is_a_warning(tmp_path, capsys):
    """Eval results are written before they are logged: an unreachable tracker then does not fail
    the stage, it is reported."""
    run = tmp_path / "run"
    run.mkdir()
    (run / trackers.STATE).write_text(json.dumps({"mlflow": {"run_id": "r", "tracking_uri": "nosuchscheme://x"}}))
    summary = {"artifact": {"path": str(run)}, "metrics": {"t": {"acc": {"value": 1.0}}}}
    assert trackers.log_eval(summary, tmp_path) == run
    assert f"warning: could not log the eval results to the experiment trackers of {run}" in capsys.readouterr().out


def test_turning_a_tracker_on_keeps_a_pipeline_stage_fresh(tmp_path):
    """A manifest written before the tracker sections existed, or with other trackers, still
    matches: what a stage computes does not depend on where it is logged."""
    from kiln.artifact import write_manifest
    from kiln.pipeline import freshness

    cfg = PretrainConfig(run_dir=str(tmp_path / "run"))
    request = overrides.to_dict(cfg)
    del request["logging"]["wandb"], request["logging"]["mlflow"]
    write_manifest(cfg.run_dir, "pretrain", request, [], {"steps": 1}, 0.0)
    overrides.apply(cfg, ["logging.wandb.project=elsewhere", "logging.mlflow={}"])
    assert freshness("pretrain", cfg) == "fresh"
    cfg.logging.log_interval = 7
    assert freshness("pretrain", cfg) == "config changed"
