"""Shared fixtures: a prepared demo dataset and a launcher for multi-process runs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# NeMo-Run reads its home once, at import: point it at a temp dir before any test imports it
os.environ["NEMORUN_HOME"] = tempfile.mkdtemp(prefix="kiln-test-nemorun-")
atexit.register(shutil.rmtree, os.environ["NEMORUN_HOME"], True)
RUNS_SCRIPT = Path(__file__).parent / "training" / "run_configs.py"


@pytest.fixture(scope="session", autouse=True)
def readable_stdin():
    """NeMo-Run runs shell commands through invoke, which reads stdin; pytest's captured stdin
    refuses reads, so give it an empty one."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        yield
    sys.stdin = saved


@pytest.fixture(scope="session")
def nemorun_home() -> Path:
    """Where this session's NeMo-Run experiments land (set at import, above)."""
    return Path(os.environ["NEMORUN_HOME"])


RAY_NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}


@pytest.fixture(scope="session")
def ray_two_nodes():
    """A real two-node Ray cluster on this machine (a head and one worker, one CPU each), for the
    data stages' engine=ray; stopped at the end of the session, every process of it."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import psutil
    from ray.cluster_utils import Cluster

    from kiln.ray.local import cluster_processes, terminate

    before = {p.pid for p in psutil.process_iter()}
    cluster = Cluster(initialize_head=True, head_node_args=dict(RAY_NODE))
    cluster.add_node(**RAY_NODE)
    cluster.wait_for_nodes()
    yield cluster
    members = cluster_processes(before, "/nonexistent")
    cluster.shutdown()
    terminate(members)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The shipped demo corpus, tokenized once per session with a BPE trained on it."""
    from kiln.config import PrepareConfig
    from kiln.data.prepare import prepare

    out = tmp_path_factory.mktemp("demo") / "data"
    prepare(PrepareConfig(inputs=[str(ROOT / "data/demo/corpus.jsonl")], output_dir=str(out),
                          vocab_size=2048))
    return out


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    """The tiny recipe, made quiet and deterministic for tests, plus `extra` field=value pairs."""
    fields = {
        "run_dir": str(run_dir),
        "data.blend": f"[{data}/corpus_text_document]",
        "data.tokenizer": str(data / "tokenizer"),
        "data.cache_dir": str(data.parent / "index_cache"),
        "parallel.world_size": "null",
        "logging.tensorboard": "false",
        "logging.progress_bar": "false",
        "train.eval_interval": "0",
        "schedule.warmup_steps": "2",
        "checkpoint.keep_last": "null",
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    return [f"{k}={v}" for k, v in fields.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, configs: list[list[str]], timeout: int = 600, recipe: str = "tiny") -> str:
    """Run each override list on `recipe` through `pretrain`, in one torchrun launch of `nproc` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(RUNS_SCRIPT), recipe, json.dumps(configs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


LOSSES = Path(__file__).parent / "assets" / "losses"


def check_loss_curve(name: str, metrics: dict[int, dict], tolerance: float) -> None:
    """Compare a run's per-step losses with the reference curve tests/assets/losses/<name>.json.
    Regenerate after an intended numerical change with KILN_UPDATE_GOLDEN=1."""
    path = LOSSES / f"{name}.json"
    # validation-only records (step 0, eval-only) hold no training loss
    curve = {str(step): record["loss"] for step, record in sorted(metrics.items()) if "loss" in record}
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        path.write_text(json.dumps(curve, indent=1) + "\n")
    reference = json.loads(path.read_text())
    assert curve.keys() == reference.keys(), f"{name}: steps differ from the reference curve"
    worst = max(abs(curve[s] - reference[s]) for s in reference)
    assert worst <= tolerance, f"{name}: loss deviates by {worst:.2e} from {path} (tolerance {tolerance})"


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> record; a resumed run's records replace the ones it re-ran."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records
