"""Data stages with engine=ray on Slurm: a Ray cluster across the allocation, the stage's driver on its
head node, and no Ray process left when the job ends, whether it succeeded, failed or was cancelled.

Submit side. NeMo-Run renders and submits the job: a `run.Script` carrying NeMo-Run's
`use_with_ray_cluster` metadata makes its Slurm scheduler write a `SlurmRayRequest`
(nemo_run/run/ray/slurm.py, what SlurmRayCluster and SlurmRayJob submit too) from the executor's
`ray_template`. The template is kiln's (ray_slurm.sub.j2), not NeMo-Run's ray.sub.j2, which cannot
run here: every srun there carries pyxis options (`--no-container-mount-home`, `--container-name`) and
`--mpi=pmix`, `-p=<partition>` / `-A=<account>` (a partition named "=debug"), it writes
/launch-head.sh at the root, sizes steps for 8 GPUs and 128 CPUs, and stops no Ray process at the end.
SlurmRayCluster.create hard-codes that template and SlurmRayJob.start calls squeue even on a dry run,
so kiln goes through the experiment path, which takes the template from the executor; the job dir,
packaging (launch.code), env, secrets and setup_lines are kiln's Slurm executor's, as for any job.

Job side: one srun step per node runs kiln.launch.ray_node, which supervises that node's Ray and
stops every process of it by pid when the batch script's exit trap asks, or on scancel.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from kiln.errors import ConfigError
from kiln.launch import executors
from kiln.launch.config import LaunchConfig

TEMPLATE = str(Path(__file__).with_name("ray_slurm.sub.j2"))  # NeMo-Run's fill_template takes an absolute path
CONTAINER_CODE = "/nemo_run/code"  # where NeMo-Run mounts the job dir in a container
SUPERVISOR = ["python", "-m", "kiln.launch.ray_node"]


# ---- submit side ----------------------------------------------------------------------------------

def engine(cfg) -> str | None:
    return getattr(cfg, "engine", None)


def starts_cluster(cfg, launch: LaunchConfig) -> bool:
    """A Slurm job that brings its own Ray cluster: a stage with engine=ray and no ray.address (with
    one, the job joins that cluster like any Slurm job), or a driver script marked for a Ray cluster."""
    from nemo_run.config import USE_WITH_RAY_CLUSTER_KEY, Script

    if isinstance(cfg, Script):
        return bool(cfg.metadata.get(USE_WITH_RAY_CLUSTER_KEY))
    return launch.executor == "slurm" and engine(cfg) == "ray" and not cfg.ray.address


def check(cfg, launch: LaunchConfig) -> None:
    """Refuse what cannot run, before anything starts."""
    if engine(cfg) != "ray":
        return
    if launch.executor == "docker":
        raise ConfigError(
            "engine=ray with --executor docker: NeMo-Run 0.11.1 starts Ray clusters on Slurm, KubeRay, Lepton and "
            "DGX Cloud, not in Docker, and a driver in a bridged container cannot be reached by Ray's workers; use "
            "--executor slurm (kiln starts a cluster across the allocation), --executor local (a local cluster, or "
            "ray.address=<host:port> of a running one), or engine=local in the container")


def layout(cfg, launch: LaunchConfig) -> str:
    """What --dryrun shows next to the sbatch script."""
    s = launch.slurm
    if not starts_cluster(cfg, launch):
        return f"# Ray: the job joins the running cluster at ray.address={cfg.ray.address}; kiln starts none"
    slurm_cpus = f"launch.slurm.cpus_per_task={s.cpus_per_task}" if s.cpus_per_task else \
        "Slurm's default for 1 task (set launch.slurm.cpus_per_task, or launch.slurm.exclusive=true)"
    ray_cpus = f"{cfg.ray.num_cpus} (ray.num_cpus)" if cfg.ray.num_cpus else "all Slurm allocated on the node"
    store = f"{s.ray.object_store_mb} MB (launch.slurm.ray.object_store_mb)" if s.ray.object_store_mb else \
        "Ray's default (30% of the node's memory)"
    workers = f"nodes 1-{s.nodes - 1} of the allocation, one Ray worker node each" if s.nodes > 1 else "none"
    return "\n".join([
        f"# Ray cluster on Slurm: {s.nodes} node(s) (launch.slurm.nodes), one Ray node per Slurm node, 1 task each "
        f"(whatever launch.slurm.tasks_per_node says); node names are known once allocated",
        "#   head node:    node 0: Ray head (GCS, free ports picked at start) + the stage's driver "
        "(RAY_ADDRESS=<head>, RAY_AUTH_MODE=disabled)",
        f"#   worker nodes: {workers}",
        f"#   CPUs per node: Slurm: {slurm_cpus}; Ray: {ray_cpus}",
        f"#   object store per node: {store}",
        f"#   shared storage: {cfg.ray.work_dir or '<output_dir>.work'} (ray.work_dir) and the job dir, on every node",
        "#   at exit: each node's supervisor stops its Ray processes by pid (SIGTERM, then SIGKILL)",
    ])


def executor(launch: LaunchConfig):
    """kiln's Slurm executor (account, partition, time, container, env, secrets, setup_lines, code),
    one task per node, rendering kiln's Ray template."""
    one_per_node = dataclasses.replace(launch, slurm=dataclasses.replace(launch.slurm, tasks_per_node=1))
    ex = executors.slurm(one_per_node)
    ex.ray_template = TEMPLATE
    for name in ("KILN_SLURM_BIN", "MASTER_ADDR", "KILN_ON_PREEMPT", "KILN_PREEMPT_DIR"):  # training's requeue
        ex.env_vars.pop(name, None)
    ex.env_vars["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60's token auth hangs clients: every node and the driver
    ex.env_vars["KILN_RAY_START_TIMEOUT"] = str(launch.slurm.ray.start_timeout)
    return ex


def driver(name: str, cfg):
    """The job's command on the head node: NeMo-Run's fdl_runner on `run_stage(cfg)`, the task every
    kiln job runs. The serialized config is an argument: a file in the job dir could only be written
    after NeMo-Run creates that dir, at launch."""
    import nemo_run as run
    from nemo_run.config import USE_WITH_RAY_CLUSTER_KEY
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from kiln.launch.task import run_stage, to_run_config

    if isinstance(cfg, run.Script):
        return cfg
    blob = ZlibJSONSerializer().serialize(run.Partial(run_stage, cfg=to_run_config(cfg)))  # URL-safe base64
    return run.Script(path="nemo_run.core.runners.fdl_runner", args=["-n", name, blob], m=True,
                      entrypoint="python", metadata={USE_WITH_RAY_CLUSTER_KEY: True})


def complete(job, launch: LaunchConfig, cfg) -> None:
    """Once NeMo-Run assigned the job its directory: give the template the srun options of every step
    and each node's supervisor command."""
    ex, s = job.executor, launch.slurm
    job_dir = f"{ex.tunnel.job_dir}/{Path(ex.job_dir).name}"  # as the cluster sees it
    in_container = bool(s.container_image)
    # logs in the job dir, which exists at submission: NeMo-Run's default (<job dir>/ray/logs) does not,
    # and sbatch cannot open its --output there
    ex.job_details.folder = job_dir
    srun = ["--overlap", *s.srun_args]
    if in_container:
        mounts = [*s.container_mounts, f"{job_dir}:/nemo_run", f"{job_dir}/ray:{job_dir}/ray"]
        names = [*ex.env_vars, "RAY_ADDRESS", *launch.secrets]
        srun += [f"--container-image={s.container_image}", f"--container-mounts={','.join(mounts)}",
                 f"--container-env={','.join(names)}", "--no-container-mount-home", "--container-name=kiln-ray"]
        if launch.code == "ship":
            srun.append(f"--container-workdir={CONTAINER_CODE}")
    elif launch.code == "ship":
        srun.append(f"--chdir={job_dir}/code")  # `python -m` imports the shipped kiln first
    node = [*SUPERVISOR, "--cluster-dir", f"{job_dir}/ray"]
    if getattr(getattr(cfg, "ray", None), "num_cpus", None):
        node += ["--num-cpus", str(cfg.ray.num_cpus)]
    if s.ray.object_store_mb:
        node += ["--object-store-mb", str(s.ray.object_store_mb)]
    lines = ["# kiln.launch.ray_slurm: srun options of every step, and each node's Ray supervisor",
             f"kiln_srun=({shlex.join(srun)})", f"kiln_ray_node=({shlex.join(node)})"]
    ex.setup_lines = "\n".join(filter(None, [ex.setup_lines, *lines]))
