"""Rendered sbatch scripts and docker requests, against golden files, and secrets never in them.

Regenerate the goldens after an intended change with KILN_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kiln import overrides
from kiln.errors import ConfigError
from kiln.launch import submit
from kiln.launch.config import LaunchConfig
from kiln.launch.sites import load_site
from kiln.recipes.pretrain import llama3_70b, tiny

GOLDEN = Path(__file__).parents[1] / "assets" / "golden"
SECRET = "hf_do_not_leak_0123456789"


def normalize(text: str) -> str:
    text = text.replace(str(Path(__file__).resolve().parents[2]), "<checkout>")  # where kiln's code is shipped from
    text = re.sub(r"(kiln-[a-z-]+)[_-]\d{10,}", r"\1_<id>", text)
    text = re.sub(r"\b(pretrain|prepare)-[a-z0-9]{12,}\b", r"\1-<job>", text)
    text = re.sub(r"'\d+'(\n\s+- --nnodes)", r"'<rdzv-id>'\1", text)
    return text


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; if intended, rerun with KILN_UPDATE_GOLDEN=1"


@pytest.fixture()
def secret_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET + "_wandb")


def test_llama3_70b_on_8_nodes_of_the_example_site(secret_env):
    launch = load_site("example")
    launch.slurm.nodes = 8
    cfg = llama3_70b()
    cfg.checkpoint.resume = True
    text = submit.render("kiln-pretrain", [submit.Task("pretrain", cfg, 64)], launch)
    assert SECRET not in text
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@300", "#SBATCH --exclusive",
                 "#SBATCH --account=myteam_llm", "#SBATCH --partition=batch", "export NCCL_IB_TIMEOUT=22",
                 "export KILN_ON_PREEMPT=requeue"):
        assert line in text
    # explicit variables and secrets enter the container by name
    assert "--container-env MASTER_ADDR,NCCL_IB_TIMEOUT,TORCH_NCCL_AVOID_RECORD_STREAMS,CUDA_DEVICE_MAX_CONNECTIONS," \
           "KILN_ON_PREEMPT,KILN_PREEMPT_DIR,HF_TOKEN,WANDB_API_KEY" in text
    # decided on the batch host, outside the container: the rendezvous address, and the requeue after srun
    head = text.index('head_node=${nodes_array[0]}')
    assert head < text.index("export MASTER_ADDR=$head_node") < text.index("srun --output")
    slurm_bin = 'export KILN_SLURM_BIN="$(dirname "$(command -v scontrol)")"'
    assert text.index(slurm_bin) < text.index("trap kiln_after_job EXIT")
    assert '"${KILN_SLURM_BIN:-/usr/bin}"/scontrol requeue "$SLURM_JOB_ID"' in text
    assert "/pretrain/preempted_${SLURM_JOB_ID}_${SLURM_RESTART_COUNT:-0}" in text
    assert "registry.example.com#myteam/kiln:0.1.0" in text  # the kiln image, not the stock NGC one
    check_golden("sbatch_llama3_70b_example_site.sh", normalize(text))


def test_docker_request(secret_env, tmp_path):
    launch = LaunchConfig(executor="docker", experiments_dir=str(tmp_path / "home"))
    launch.docker.volumes = ["/data:/data"]
    cfg = tiny()
    cfg.model.vocab_size = 1000
    text = submit.render("kiln-pretrain", [submit.Task("pretrain", cfg, 2)], launch)
    assert SECRET not in text
    assert "<secrets file written at launch>:/run/kiln/secrets.env:ro" in text
    for line in ("container_image: kiln:0.1.0", "ipc_mode: host", "shm_size: 16g",
                 "- memlock:-1", "num_gpus: -1", "- /data:/data", "--nproc-per-node"):
        assert line in text
    assert not (tmp_path / "home" / "secrets").exists() or not any((tmp_path / "home" / "secrets").iterdir())
    check_golden("docker_tiny.yaml", normalize(re.sub(r"/tmp/kiln-dryrun-\w+", "<scratch>", text)))


def test_secret_values_in_env_are_refused():
    launch = LaunchConfig(executor="slurm", env={"HF_TOKEN": "x"})
    with pytest.raises(ConfigError, match="launch.env sets HF_TOKEN, which is also listed in launch.secrets"):
        submit.render("kiln-pretrain", [submit.Task("pretrain", tiny(), 2)], launch)


def test_site_profile_errors_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("slurm:\n  nodez: 2\n")
    monkeypatch.setenv("KILN_SITES_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config field 'slurm.nodez'"):
        load_site("bad")
    with pytest.raises(ConfigError, match=r"--site nowhere: .* does not exist \(sites in .*: bad\)"):
        load_site("nowhere")


def test_launch_overrides_reach_the_script():
    launch = load_site("example")
    overrides.apply(launch, ["slurm.nodes=2", "slurm.requeue=false", "slurm.time=00:30:00"])
    cfg = llama3_70b()
    text = submit.render("kiln-pretrain", [submit.Task("pretrain", cfg, 16)], launch)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --no-requeue" in text
    assert "export KILN_ON_PREEMPT=resubmit" in text and "#SBATCH --time=00:30:00" in text
    assert '/sbatch --parsable --dependency=afterany:"$SLURM_JOB_ID" "$script"' in text  # from the exit trap


def test_python_api_validates_where_the_task_is_built():
    """to_partial checks the config for the executor's world size in the caller: one ConfigError
    listing every problem, instead of a traceback from every rank after launch."""
    import nemo_run as run

    from kiln.launch import to_partial

    cfg = tiny()
    cfg.model.vocab_size = 1000
    cfg.optimizer.lr = -1
    with pytest.raises(ConfigError) as err:
        to_partial(cfg, run.LocalExecutor(ntasks_per_node=3, launcher="torchrun"))
    text = str(err.value)
    assert "optimizer.lr=-1 must be > 0" in text or "optimizer.lr=-1.0 must be > 0" in text
    cfg.optimizer.lr = 1e-3
    with pytest.raises(ConfigError, match="parallel.world_size=2 but 3 processes were launched"):
        to_partial(cfg, run.LocalExecutor(ntasks_per_node=3, launcher="torchrun"))


def test_launch_nproc_sets_the_local_world_size():
    from kiln.launch.driver import world_size
    from kiln.stages import STAGES

    launch = LaunchConfig()
    assert world_size(STAGES["pretrain"], tiny(), launch) == 2
    launch.nproc = 4
    assert world_size(STAGES["pretrain"], tiny(), launch) == 4
    assert world_size(STAGES["pretrain"], tiny(), launch, nproc=1) == 1  # --nproc wins
    assert world_size(STAGES["prepare"], None, launch) == 1  # single-process stages
