"""One Ray node of a Slurm job (kiln.launch.ray_slurm), supervised so that none of its processes
outlives the job: `python -m kiln.launch.ray_node --cluster-dir DIR (--head | --address HOST:PORT)`.

`ray start` runs in a job-private temp dir, under this process made a child subreaper: Ray's daemons
outlive `ray start` and would otherwise be re-parented to init, out of the step that Slurm's
proctrack/linuxproc tracks by parent. When the batch script asks (a `stop` file in the cluster dir:
srun turns a SIGTERM it receives into SIGKILL for its tasks), or on SIGTERM (scancel, the time
limit), every descendant and any process whose command line names the temp dir is terminated, then
killed, until none is left. Never `ray stop`: it kills every Ray process of the user on the node.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str] | None = None) -> int:
    from kiln import bootstrap

    p = argparse.ArgumentParser(prog="python -m kiln.launch.ray_node")
    p.add_argument("--cluster-dir", required=True, help="shared: the head's address, joined nodes, stop request")
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true")
    role.add_argument("--address", help="the head's host:port")
    p.add_argument("--num-cpus", type=int, help="default: the CPUs Slurm allocated on this node")
    p.add_argument("--object-store-mb", type=int, help="default: Ray's")
    args = p.parse_args(argv)
    bootstrap.start_rank()  # this kiln on PYTHONPATH (Ray's workers inherit it), the submit dir as cwd
    os.environ["RAY_AUTH_MODE"] = "disabled"
    _become_subreaper()
    signalled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: signalled.append(signum))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # launch.slurm.signal is for training's checkpoints

    host = socket.gethostname()
    cluster_dir = Path(args.cluster_dir)
    stop_file = cluster_dir / "stop"
    # private to this node of this job: the sweep at the end matches it in command lines (job ids repeat
    # across clusters, and "kiln-ray-1" is a prefix of "kiln-ray-12")
    temp_dir = Path(tempfile.mkdtemp(prefix=f"kiln-ray-{os.environ.get('SLURM_JOB_ID', 'job')}-"))
    cpus = args.num_cpus or int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}",
           "--disable-usage-stats", "--dashboard-agent-listen-port=0"]
    if args.object_store_mb:
        cmd.append(f"--object-store-memory={args.object_store_mb * 1_000_000}")
    if args.head:  # free ports: other clusters, or another job's, may share the node
        cmd += ["--head", "--port=0", "--include-dashboard=false", f"--ray-client-server-port={_free_port()}"]
    else:
        cmd.append(f"--address={args.address}")

    def stopping() -> bool:
        return bool(signalled) or stop_file.exists()

    print(f"kiln ray {host}: {shlex.join(cmd)}", flush=True)  # info lines: not `kiln: `, which reports errors
    try:
        start = subprocess.Popen(cmd)
        while start.poll() is None and not stopping():
            time.sleep(0.2)
        if start.returncode:
            print(f"kiln: {host}: ray start failed (exit code {start.returncode})", file=sys.stderr, flush=True)
            return start.returncode
        if stopping():
            return 0
        if args.head:
            address = (temp_dir / "ray_current_cluster").read_text().strip()
            head_ip, port = address.rsplit(":", 1)
            # NeMo-Run's ray_cluster_info.json, which SlurmRayCluster.status reads
            _publish(cluster_dir / "ray_cluster_info.json", f'{{"head_ip": "{head_ip}", "port": "{port}"}}\n')
            _publish(cluster_dir / "ray_address", address + "\n")
        else:
            (cluster_dir / "joined" / host).touch()
        print(f"kiln ray {host}: Ray node up ({cpus} CPUs)", flush=True)
        while not stopping():
            time.sleep(1)
            _reap()
            if "raylet" not in _names(_alive(_descendants())):
                print(f"kiln: {host}: this node's raylet died", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        ended = stop_ray(str(temp_dir))
        print(f"kiln ray {host}: Ray stopped, {ended} process(es) ended by pid", flush=True)


def stop_ray(temp_dir: str, grace: float = 5.0) -> int:
    """End every process of this node's Ray: this supervisor's descendants and any process whose command
    line names the job's temp dir. SIGTERM, then SIGKILL after `grace`, again until none is left (a dying
    raylet may still start a worker). Returns how many were ended."""
    me, ended = os.getpid(), set()
    for _ in range(5):
        found = {p.pid: p for p in _descendants()}
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != me and temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        targets = _alive(found.values())
        if not targets:
            break
        for p in targets:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(targets, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        ended.update(p.pid for p in targets)
        _reap()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(ended)


def _become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("kiln: prctl(PR_SET_CHILD_SUBREAPER) failed: orphaned Ray processes are found by temp dir only",
              file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _publish(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _alive(processes) -> list[psutil.Process]:
    alive = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _names(processes) -> set[str]:
    names = set()
    for p in processes:
        with contextlib.suppress(psutil.Error):
            names.add(p.name())
    return names


def _reap() -> None:
    """Orphans re-parented to this subreaper become its zombies once they exit."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


if __name__ == "__main__":
    sys.exit(main())
