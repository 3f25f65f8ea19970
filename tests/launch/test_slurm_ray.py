"""Data stages with engine=ray on Slurm (kiln.launch.ray_slurm): the rendered job, and jobs on the
single-node Slurm cluster (conftest.py) that start a Ray cluster through NeMo-Run's Slurm Ray path,
run the driver on its head node and leave no process of the job behind, on success or failure.

A job's processes are found by their environment (SLURM_JOB_ID and this cluster's SLURM_CONF), which
Ray's workers keep when they rename themselves (ray::IDLE): Slurm's proctrack/linuxproc here loses a
daemon whose parent exited, so "the job ended" alone proves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest

from kiln import cli
from kiln.launch import slurm, submit
from kiln.launch.config import LaunchConfig
from tests.launch.conftest import needs_slurm

pytestmark = pytest.mark.slow
SLURM_PORTS = (16827, 16828)  # apart from test_slurm.py's cluster, so both can run at once
PROBE = Path(__file__).with_name("ray_probe.py")


def test_dryrun_prints_the_ray_layout_and_the_sbatch_script(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"id": "a", "text": "hello"}\n')
    rc = cli.main(["curate", "--input", str(raw), "--output", str(tmp_path / "out"), "engine=ray", "ray.num_cpus=6",
                   "--executor", "slurm", "launch.slurm.nodes=4", "launch.slurm.cpus_per_task=8",
                   "launch.slurm.ray.object_store_mb=100", "launch.slurm.partition=batch", "--dryrun"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("# Ray cluster on Slurm: 4 node(s) (launch.slurm.nodes), one Ray node per Slurm node",
                 "#   worker nodes: nodes 1-3 of the allocation, one Ray worker node each",
                 "#   CPUs per node: Slurm: launch.slurm.cpus_per_task=8; Ray: 6 (ray.num_cpus)",
                 "#   object store per node: 100 MB (launch.slurm.ray.object_store_mb)",
                 "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --partition=batch", "export RAY_AUTH_MODE=disabled",
                 'start_node "$head_node" head --head',  # the head, then a worker per other node, then the driver
                 'start_node "${nodes[$i]}" "worker-$i" --address "$RAY_ADDRESS"',
                 "trap stop_cluster EXIT", 'touch "$CLUSTER_DIR/stop"', "nothing was started (--dryrun)"):
        assert line in out, line
    node = re.search(r"^kiln_ray_node=\((.*)\)$", out, re.M).group(1)
    assert re.fullmatch(r"python -m kiln\.launch\.ray_node --cluster-dir \S+/curate/ray --num-cpus 6 "
                        r"--object-store-mb 100", node), node
    srun = re.search(r"^kiln_srun=\((.*)\)$", out, re.M).group(1)
    assert re.fullmatch(r"--overlap --chdir=\S+/curate/code", srun) and "--container" not in out, srun
    head, workers, driver = (out.index(s) for s in ('start_node "$head_node"', 'start_node "${nodes',
                                                      "python -m nemo_run.core.runners.fdl_runner"))
    assert head < workers < driver
    # the driver runs kiln's run_stage, as every kiln job, on this config
    import fiddle as fdl
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    blob = re.search(r'-w "\$head_node" -o "\$LOG_DIR/ray-job\.log" \\\n\s+python -m nemo_run\.core\.runners\.'
                     r"fdl_runner -n curate (\S+)\n", out).group(1)
    task = fdl.build(ZlibJSONSerializer().deserialize(blob))
    assert task.func.__name__ == "run_stage"
    cfg = task.keywords["cfg"]
    assert (cfg.engine, cfg.inputs, cfg.output_dir, cfg.ray.num_cpus) == ("ray", [str(raw)], str(tmp_path / "out"), 6)


def test_in_a_container_every_step_gets_the_image_and_the_variables(monkeypatch):
    from kiln.config import CurateConfig

    monkeypatch.setenv("HF_TOKEN", "hf_never_in_the_script")
    launch = LaunchConfig(executor="slurm")
    launch.slurm.container_image = "nvcr.io/acme/kiln:0.1.0"
    launch.slurm.container_mounts = ["/lustre:/lustre"]
    launch.env = {"OMP_NUM_THREADS": "4"}
    text = submit.render("kiln-curate", [submit.Task("curate", CurateConfig(inputs=["/lustre/raw.jsonl"],
                                                                           output_dir="/lustre/out", engine="ray"))],
                         launch)
    srun = re.search(r"^kiln_srun=\((.*)\)$", text, re.M).group(1).split()
    assert "--container-image=nvcr.io/acme/kiln:0.1.0" in srun and "--container-workdir=/nemo_run/code" in srun
    mounts = next(a for a in srun if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert mounts[0] == "/lustre:/lustre" and any(m.endswith("/curate:/nemo_run") for m in mounts)
    names = next(a for a in srun if a.startswith("--container-env=")).split("=", 1)[1].split(",")
    assert {"RAY_AUTH_MODE", "RAY_ADDRESS", "OMP_NUM_THREADS", "HF_TOKEN", "KILN_RAY_START_TIMEOUT"} <= set(names)
    assert "hf_never_in_the_script" not in text


@pytest.mark.parametrize("executor", ["docker"])
def test_combinations_that_cannot_run_are_refused(tmp_path, capsys, executor):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"id": "a", "text": "hello"}\n')
    rc = cli.main(["curate", "--input", str(raw), "--output", str(tmp_path / "out"), "engine=ray",
                   "--executor", executor, "--dryrun"])
    err = capsys.readouterr().err
    assert rc != 0 and "engine=ray with --executor docker" in err and "--executor slurm" in err, err


# ---- on the local Slurm cluster -------------------------------------------------------------------

def ray_launch(no_slurm: Path) -> LaunchConfig:
    launch = LaunchConfig(executor="slurm")
    launch.slurm.partition = "debug"
    launch.slurm.time = "00:10:00"
    launch.slurm.setup_lines = [f"export PATH={no_slurm}:$PATH"]  # no Slurm command inside the job's steps
    launch.slurm.ray.object_store_mb = 100  # this machine has 2 CPUs and little shared memory to spare
    launch.slurm.ray.start_timeout = 180
    return launch


def logs_of(job_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(job_dir.glob("*.[lo][ou][gt]")))


def job_processes(job: str) -> list[psutil.Process]:
    """Processes of this cluster's Slurm job `job`, by their environment."""
    found = []
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            env = p.environ()
            if env.get("SLURM_JOB_ID") == job and env.get("SLURM_CONF") == os.environ["SLURM_CONF"] \
                    and p.info["name"] != "slurmstepd":
                found.append(p)
    return found


def assert_none_left(job: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while (left := job_processes(job)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.name(), " ".join(p.cmdline())[:120]) for p in left]


@needs_slurm
def test_ray_cluster_driver_and_teardown_on_slurm(cluster, no_slurm_in_tasks, tmp_path):
    """One node, 1 Ray CPU, a 100 MB object store. The driver leaves an actor that ignores SIGTERM and
    a daemonized orphan, then fails: the job fails, and no process of it is left."""
    import nemo_run as run
    from nemo_run.config import USE_WITH_RAY_CLUSTER_KEY

    release = tmp_path / "release"
    probe = run.Script(path=str(PROBE), args=["--stubborn", "--hold", str(release), "--exit", "3"],
                       entrypoint="python", metadata={USE_WITH_RAY_CLUSTER_KEY: True})
    launch = ray_launch(no_slurm_in_tasks)
    result = submit.submit("kiln-test-ray", [submit.Task("probe", probe)], launch, detach=True)
    job, logs = result.slurm_jobs["probe"], result.experiment_dir / "probe"
    deadline = time.time() + 240
    while "probe: " not in ((logs / "ray-job.log").read_text() if (logs / "ray-job.log").exists() else ""):
        assert time.time() < deadline and slurm.state(job) in ("PENDING", "RUNNING"), logs_of(logs)
        time.sleep(0.5)
    report = json.loads((logs / "ray-job.log").read_text().split("probe: ", 1)[1].splitlines()[0])
    (node,) = report["nodes"]
    assert node["resources"]["CPU"] == 1.0 and node["resources"]["object_store_memory"] == 100_000_000
    assert report["auth"] == report["task"]["auth"] == "disabled"
    assert report["task"]["kiln"] == str(logs / "code" / "kiln" / "__init__.py")  # Ray's workers run the shipped kiln
    running = job_processes(job)
    names = {p.name() for p in running}
    assert {"raylet", "gcs_server", "ray::Stubborn", "sleep"} <= names, names
    supervisor = next(p for p in running if p.cmdline()[1:3] == ["-m", "kiln.launch.ray_node"])
    orphan = next(p for p in running if p.name() == "sleep")
    assert orphan.ppid() == supervisor.pid  # re-parented to the subreaper, not to init, so it is found

    release.touch()
    assert slurm.wait({"probe": job}, on_change=lambda _: None) == {"probe": "FAILED"}
    assert_none_left(job)
    alive = [p for p in running if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name(), p.status(), p.ppid()) for p in alive]
    head = (logs / "ray-head.log").read_text()
    assert re.search(r"kiln ray \S+: Ray stopped, \d+ process\(es\) ended by pid", head), head[-2000:]
    assert "kiln ray: cluster stopped (job exit code 3)" in next(logs.glob("sbatch_*.out")).read_text()
    assert submit.reported_errors(result.experiment_dir) == []  # the driver's failure, no kiln error: nothing
    temp_dir = re.search(r"--temp-dir=(\S+)", head).group(1)
    assert not Path(temp_dir).exists()  # the node's private Ray temp dir is gone


@needs_slurm
def test_kiln_curate_engine_ray_on_slurm_writes_the_local_engines_bytes(cluster, no_slurm_in_tasks, tmp_path,
                                                                        nemorun_home):
    from kiln.config import CurateConfig, RayConfig
    from kiln.curation.curate import curate
    from kiln.launch.driver import launch_stage
    from kiln.stages import STAGES
    from tests.curation.synthetic import generate

    generate(tmp_path / "raw.jsonl", 400, junk_share=0.05, foreign=0.05, seed=5)

    def config(engine: str, out: str) -> CurateConfig:
        return CurateConfig(inputs=[str(tmp_path / "raw.jsonl")], output_dir=str(tmp_path / out), shard_mb=0.1,
                            engine=engine, ray=RayConfig(num_cpus=1, split_mb=0.3, buckets=2))

    local = curate(config("local", "local"))
    said: list[str] = []
    rc = launch_stage(STAGES["curate"], config("ray", "ray"), ray_launch(no_slurm_in_tasks), echo=said.append)
    assert rc == 0, said
    (experiment,) = re.findall(r"experiment (\S+): \{'curate': 'SUCCEEDED'\}", "\n".join(said))
    job = re.search(r"_(\d+)\.out$", str(next(nemorun_home.glob(f"experiments/kiln-curate/{experiment}/curate/"
                                                                 "sbatch_kiln-curate_*.out")))).group(1)

    def shards(out: str) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((tmp_path / out).glob("curated_*"))}

    assert shards("ray") == shards("local") and len(shards("local")) > 1
    report = json.loads((tmp_path / "ray" / "curation_report.json").read_text())
    timings = {"seconds", "docs_per_second", "wall_seconds", "engine"}
    assert {k: v for k, v in report.items() if k not in timings} == \
        {k: v for k, v in local.items() if k not in timings}
    assert report["engine"]["name"] == "ray" and report["engine"]["nodes"] == 1
    assert_none_left(job)
