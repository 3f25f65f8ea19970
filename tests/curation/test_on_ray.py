"""`kiln curate engine=ray` on a real two-node Ray cluster on this machine: the same bytes and
figures as the local engine, tasks on both nodes, and a run that lost a node and its driver
resumes from its completed tasks to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.config import CurateConfig, RayConfig
from kiln.curation.curate import curate
from kiln.data import splits
from kiln.errors import ConfigError
from kiln.ray import tasks as ray_tasks
from tests.conftest import RAY_NODE
from tests.curation.synthetic import generate

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = {"seconds", "docs_per_second", "wall_seconds", "engine"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two input files, the first cut into several splits; planted copies cross split boundaries."""
    root = tmp_path_factory.mktemp("corpus")
    truth = generate(root / "a.jsonl", 900, junk_share=0.05, foreign=0.05, seed=3)
    generate(root / "b.jsonl", 300, junk_share=0.05, foreign=0.05, seed=4)
    return [str(root / "a.jsonl"), str(root / "b.jsonl")], truth


def _config(inputs, out, **ray) -> CurateConfig:
    return CurateConfig(inputs=inputs, output_dir=str(out), shard_mb=0.1, engine="ray" if ray else "local",
                        ray=RayConfig(split_mb=0.1, buckets=3, **ray))


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("curated_*"))}


def _figures(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory):
    inputs, _ = corpus
    out = tmp_path_factory.mktemp("local") / "out"
    curate(_config(inputs, out))
    return _outputs(out), json.loads((out / "curation_report.json").read_text())


def test_split_boundaries_separate_planted_copies(corpus):
    inputs, truth = corpus
    lines = {json.loads(line)["id"]: n for n, line in enumerate(Path(inputs[0]).read_text().splitlines(), 1)}
    plan = splits.plan([Path(inputs[0])], int(0.1 * 2**20))
    starts = [s.first_line for s in plan]

    def split_of(doc):
        return sum(start <= lines[doc] for start in starts)

    crossing = [c for c, (s, _) in truth["near"].items() if split_of(c) != split_of(s)]
    crossing += [c for c, s in truth["exact"].items() if split_of(c) != split_of(s)]
    assert len(plan) >= 3 and len(crossing) >= 10, (len(plan), len(crossing))


@pytest.mark.slow
def test_two_nodes_write_the_local_engines_bytes_and_figures(ray_two_nodes, corpus, local, tmp_path):
    inputs, _ = corpus
    report = curate(_config(inputs, tmp_path / "ray", address=ray_two_nodes.address))
    outputs, local_report = local
    assert _outputs(tmp_path / "ray") == outputs and len(outputs) > 3
    assert _figures(report) == _figures(local_report)
    assert report["fuzzy_dedup"]["removed"] > 0 and report["exact_dedup"]["removed"] > 0
    engine = report["engine"]
    assert engine["nodes"] == 2 and engine["phases"]["map"]["tasks"] == engine["splits"] >= 4
    assert not Path(f"{tmp_path / 'ray'}.work").exists()  # intermediates go once the output is complete


@pytest.mark.slow
def test_a_lost_node_and_a_killed_driver_resume_to_the_same_bytes(ray_two_nodes, corpus, local, tmp_path):
    """A worker node is removed while the map runs and the driver is killed; the rerun reuses
    the completed tasks on the surviving node and writes the same bytes."""
    inputs, _ = corpus
    spare = ray_two_nodes.add_node(**RAY_NODE)
    ray_two_nodes.wait_for_nodes()
    out = tmp_path / "ray"
    overrides = [f"--input={p}" for p in inputs] + [
        f"--output={out}", "shard_mb=0.1", "engine=ray", "ray.split_mb=0.1", "ray.buckets=3",
        f"ray.address={ray_two_nodes.address}"]
    command = [sys.executable, "-m", "kiln.cli", "curate", *overrides]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = Path(f"{out}.work") / "done"
    deadline = time.time() + 120
    while len(list(done.glob("map-*.json"))) < 2 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    ray_two_nodes.remove_node(spare)
    time.sleep(1.0)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    completed = len(list(done.glob("*.json")))
    assert completed >= 2 and not out.exists(), driver.stdout.read().decode()[-2000:]

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs, local_report = local
    assert _outputs(out) == outputs
    report = json.loads((out / "curation_report.json").read_text())
    assert _figures(report) == _figures(local_report)
    assert report["engine"]["phases"]["map"]["reused"] >= 2


def test_an_unreachable_cluster_fails_before_any_work(corpus, tmp_path):
    inputs, _ = corpus
    with pytest.raises(ConfigError, match=r"ray.address=127.0.0.1:9: nothing answers there .*ray start --head"):
        curate(_config(inputs, tmp_path / "out", address="127.0.0.1:9"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_stale_address_file_is_named_with_the_fix(corpus, tmp_path, monkeypatch):
    from kiln.ray import connect

    stale = tmp_path / "ray_current_cluster"
    stale.write_text("10.0.0.1:6379")
    monkeypatch.setattr(connect, "ADDRESS_FILE", stale)
    monkeypatch.setattr(connect.psutil, "process_iter", lambda *a, **k: iter([]))  # no raylet on this machine
    inputs, _ = corpus
    with pytest.raises(ConfigError, match=f"{stale} names 10.0.0.1:6379, but no raylet runs .* stale"):
        curate(_config(inputs, tmp_path / "out", address="auto"))


def test_engine_ray_refuses_single_machine_backends(corpus, tmp_path):
    inputs, _ = corpus
    cfg = _config(inputs, tmp_path / "out", address="auto")
    cfg.filters.engine, cfg.dedup_backend = "curator", "gpu"
    with pytest.raises(ConfigError) as err:
        curate(cfg)
    assert "filters.engine=curator" in str(err.value) and "dedup_backend=gpu" in str(err.value)


@pytest.mark.slow
def test_an_unreadable_input_stops_the_run_naming_it(ray_two_nodes, corpus, tmp_path):
    """Reading fails with EIO on every attempt: Ray retries it, then the run stops naming the file."""
    inputs, _ = corpus
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.symlink_to("/proc/self/mem")  # any read at offset 0 fails with an I/O error
    cfg = _config([inputs[1], str(unreadable)], tmp_path / "out", address=ray_two_nodes.address, max_task_retries=1)
    with pytest.raises(ray_tasks.TaskFailed, match=rf"map-\d+ on {unreadable} failed after 1 retries: OSError"):
        curate(cfg)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
