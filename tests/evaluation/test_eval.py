"""`kiln eval`: lm-eval on a tiny model trained here, offline; kiln's engine on the Megatron
checkpoint (TP=2) against lm-eval's hf model on its HF export; the gate; bad task files and
endpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import ConvertConfig, EvalConfig, PrepareConfig
from kiln.errors import ConfigError, EndpointError, RegressionError
from kiln.evaluation.evaluate import evaluate
from tests.conftest import ROOT, free_port, launch, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo corpus with 5 % held out, a tiny Llama pretrained 24 steps on the rest (checkpoints
    at steps 2 and 24), and its HF export."""
    from kiln.conversion.convert import convert
    from kiln.data.prepare import prepare

    root = tmp_path_factory.mktemp("eval")
    prepare(PrepareConfig(inputs=[str(ROOT / "data/demo/corpus.jsonl")], output_dir=str(root / "data"),
                          vocab_size=2048, heldout=0.05))
    launch(1, [tiny_overrides(root / "data", root / "pretrain", train__steps="24", parallel__tp="1",
                              checkpoint__save_interval="2", train__eval_interval="0")])
    convert(ConvertConfig(source=str(root / "pretrain"), output=str(root / "hf"), to="hf"))
    return root


def kiln_eval(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                str(free_port()), "-m", "kiln.cli"] if nproc > 1 else [sys.executable, "-m", "kiln.cli"]
    return subprocess.run([*launcher, "eval", *args], capture_output=True, text=True, env=ENV, timeout=600)


def metrics(out: Path) -> dict:
    return json.loads((out / "eval_summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_megatron_checkpoint_on_tp2_and_pp2_scores_the_hf_export_within_1e4(trained, tmp_path):
    heldout = str(trained / "data" / "heldout.jsonl")
    hf = evaluate(EvalConfig(source=str(trained / "hf"), suites=["heldout", "demo"], heldout=heldout,
                             output_dir=str(tmp_path / "hf")))
    proc = kiln_eval(str(trained / "pretrain"), "--tp", "2", "--suite", "heldout", "--suite", "demo",
                     "--heldout", heldout, "--output", str(tmp_path / "megatron"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    megatron = metrics(tmp_path / "megatron")
    for name in ("bits_per_byte", "word_perplexity", "byte_perplexity"):
        a, b = hf["metrics"]["kiln_heldout"][name]["value"], megatron["kiln_heldout"][name]["value"]
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (name, a, b)
    for task, name in (("kiln_demo_choice", "acc"), ("kiln_demo_generate", "exact_match")):
        assert megatron[task][name]["value"] == hf["metrics"][task][name]["value"]
    summary = json.loads((tmp_path / "megatron" / "eval_summary.json").read_text())
    assert summary["artifact"]["kind"] == "megatron" and summary["artifact"]["parallel"] == {"tp": 2, "pp": 1}
    assert summary["harness"] == {"name": "lm-eval", "version": "0.4.13"}
    assert all(entry["sha256"] for entry in summary["tasks"].values())
    assert (tmp_path / "megatron" / "samples_kiln_heldout.jsonl").exists()
    assert "bits_per_byte" in proc.stdout  # the table
    pipeline = kiln_eval(str(trained / "pretrain"), "--pp", "2", "--heldout", heldout,
                         "--output", str(tmp_path / "pp2"), nproc=2)
    assert pipeline.returncode == 0, pipeline.stderr[-3000:]
    a, b = hf["metrics"]["kiln_heldout"]["bits_per_byte"]["value"], metrics(tmp_path / "pp2")["kiln_heldout"]
    assert abs(a - b["bits_per_byte"]["value"]) <= 1e-4


@pytest.mark.slow
def test_demo_scores_rise_with_training(trained, tmp_path):
    early = kiln_eval(str(trained / "pretrain" / "checkpoints" / "iter_0000002"), "--suite", "demo",
                      "--output", str(tmp_path / "early"))
    assert early.returncode == 0, early.stderr[-3000:]
    late = evaluate(EvalConfig(source=str(trained / "hf"), suites=["demo"], output_dir=str(tmp_path / "late")))
    before, after = metrics(tmp_path / "early"), late["metrics"]
    assert before["kiln_demo_choice"]["acc"]["value"] < 0.5 < after["kiln_demo_choice"]["acc"]["value"]
    assert after["kiln_demo_generate"]["exact_match"]["value"] > before["kiln_demo_generate"]["exact_match"]["value"]


@pytest.mark.slow
def test_the_gate_fails_on_a_planted_regression_and_passes_within_tolerance(trained, tmp_path):
    heldout = str(trained / "data" / "heldout.jsonl")
    base = evaluate(EvalConfig(source=str(trained / "hf"), heldout=heldout, output_dir=str(tmp_path / "base"),
                               limit=8))
    planted = json.loads((tmp_path / "base" / "eval_summary.json").read_text())
    planted["metrics"]["kiln_heldout"]["bits_per_byte"]["value"] -= 0.05  # the baseline was better
    (tmp_path / "baseline.json").write_text(json.dumps(planted))
    with pytest.raises(RegressionError, match="kiln_heldout bits_per_byte"):
        evaluate(EvalConfig(source=str(trained / "hf"), heldout=heldout, output_dir=str(tmp_path / "now"), limit=8,
                            baseline=str(tmp_path / "baseline.json"), tolerance=0.01))
    gate = json.loads((tmp_path / "now" / "eval_summary.json").read_text())["gate"]  # the verdict is kept
    assert not gate["passed"] and gate["regressions"]
    passed = evaluate(EvalConfig(source=str(trained / "hf"), heldout=heldout, output_dir=str(tmp_path / "again"),
                                 limit=8, baseline=str(tmp_path / "baseline.json"), tolerance=0.06))
    assert passed["gate"]["passed"]
    assert passed["metrics"]["kiln_heldout"]["bits_per_byte"]["value"] == \
        base["metrics"]["kiln_heldout"]["bits_per_byte"]["value"]
    proc = kiln_eval(str(trained / "hf"), "--heldout", heldout, "--limit", "8", "--output", str(tmp_path / "cli"),
                     "--baseline", str(tmp_path / "baseline.json"))
    assert proc.returncode == 3 and "regressed" in proc.stderr


@pytest.mark.slow
def test_a_user_task_over_local_jsonl_runs(trained, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": "Rain fell softly all", "a": "day"}) + "\n" for _ in range(4)))
    task = tmp_path / "my_task.yaml"
    task.write_text(f"task: my_rain\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: ' {{a}}'\n"
                    "metric_list:\n  - metric: acc\n")
    out = evaluate(EvalConfig(source=str(trained / "hf"), suites=[], tasks=[str(task)], output_dir=str(tmp_path / "o")))
    assert set(out["metrics"]) == {"my_rain"} and out["metrics"]["my_rain"]["acc"]["value"] in (0.0, 1.0)
    assert str(task) in out["tasks"]


@pytest.mark.slow
def test_an_endpoint_served_by_kiln_serve_scores_as_the_hf_directory(trained, tmp_path):
    from tests.serving.test_serve import server

    heldout = str(trained / "data" / "heldout.jsonl")
    local = evaluate(EvalConfig(source=str(trained / "hf"), suites=["heldout", "demo"], heldout=heldout, limit=6,
                                output_dir=str(tmp_path / "local")))
    with server(trained / "hf") as url:
        served = evaluate(EvalConfig(source=str(trained / "hf"), endpoint=f"{url}/v1", suites=["heldout", "demo"],
                                     heldout=heldout, limit=6, output_dir=str(tmp_path / "served")))
    assert served["artifact"]["kind"] == "endpoint" and served["artifact"]["model"] == "hf"
    a, b = local["metrics"], served["metrics"]
    assert abs(a["kiln_heldout"]["bits_per_byte"]["value"] - b["kiln_heldout"]["bits_per_byte"]["value"]) < 1e-4
    assert a["kiln_demo_choice"]["acc"]["value"] == b["kiln_demo_choice"]["acc"]["value"]
    assert a["kiln_demo_generate"]["exact_match"]["value"] == b["kiln_demo_generate"]["exact_match"]["value"]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_malformed_and_remote_task_files_are_refused_with_file_line_and_fix(tmp_path):
    data = write(tmp_path / "d.jsonl", '{"q": "x", "a": "y"}\n')
    cases = {
        "task: t\ndataset_path: json\n  bad: [indent\n": "bad.yaml:3: not valid YAML",
        "task: t\ndataset_path: hellaswag\noutput_type: multiple_choice\n": "dataset_path 'hellaswag' is not a local",
        "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: rel/d.jsonl\n": "is relative",
        f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: {data}\n": "plain path",
        "dataset_path: json\n": "needs `task: <name>`",
    }
    for i, (text, message) in enumerate(cases.items()):
        name = "bad.yaml" if i == 0 else f"task{i}.yaml"
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            evaluate(EvalConfig(source=str(tmp_path), suites=[], tasks=[write(tmp_path / name, text)],
                                output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_config_problems_are_named_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError) as info:
        evaluate(EvalConfig(source=str(tmp_path / "nope"), suites=["heldout", "mmlu"], output_dir=str(tmp_path / "o")))
    text = str(info.value)
    assert "suites: mmlu unknown" in text and "heldout is unset" in text and "does not exist" in text


def test_an_unreachable_endpoint_names_the_url_and_the_fix(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match=r"GET http://127\.0\.0\.1:\d+/v1/models failed .*kiln serve"):
        evaluate(EvalConfig(source=str(ROOT / "tests"), endpoint=url, suites=["demo"],
                            output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
