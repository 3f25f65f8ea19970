"""A local Ray cluster for a Curator pipeline, gone when the run ends, on success or failure.

Ray 2.60's token auth hangs a client of a local cluster (RAY_AUTH_MODE=disabled). A killed run
leaves `ray_current_cluster` in Ray's temp dir, and the next start hangs on that stale address,
so it is removed when no raylet is alive. Stopping is kiln's job, not Ray's alone: `ray stop`
would kill every Ray process of the user, and RayClient.stop ends the head while the workers
it spawned (ray::StageWorker, ray::NodeResourceMonitor) live on as orphans that ignore SIGTERM.
So every process of this cluster is found by pid (what appeared at start and all descendants,
collected before the head stops, and anything whose files lie in this cluster's private temp
dir) and terminated, then killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil


@contextlib.contextmanager
def ray_cluster(num_cpus: int, object_store_bytes: int = 256 << 20) -> Iterator[object]:
    from nemo_curator.core.client import RayClient

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    # RayClient starts the `ray` command from PATH: this interpreter's, also from a bare venv
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    stale = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if stale.exists() and not any("raylet" in (p.info["name"] or "") for p in psutil.process_iter(["name"])):
        stale.unlink()
    temp_dir = tempfile.mkdtemp(prefix="kiln-ray-")
    client = RayClient(num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=False,
                       ray_temp_dir=temp_dir)
    before = {p.pid for p in psutil.process_iter()}
    try:
        client.start()
        yield client
    finally:
        members = cluster_processes(before, temp_dir)
        with contextlib.suppress(Exception):
            client.stop()
        terminate(members + cluster_processes(before, temp_dir))
        os.environ.pop("RAY_ADDRESS", None)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_processes(before: set[int], temp_dir: str) -> list[psutil.Process]:
    """Processes this cluster started: new since `before` and either descendants of one that is,
    or holding files in its temp dir (a worker whose parent already died)."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid in before or p.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if p.ppid() == me or _uses(p, temp_dir) or "ray" in p.name().lower():
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
    return list(found.values())


def _uses(p: psutil.Process, temp_dir: str) -> bool:
    with contextlib.suppress(psutil.Error):
        if any(f.path.startswith(temp_dir) for f in p.open_files()):
            return True
        return any(temp_dir in arg for arg in p.cmdline())
    return False


def terminate(processes: list[psutil.Process], grace: float = 10.0) -> None:
    alive = {p.pid: p for p in processes}
    for p in alive.values():
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, still = psutil.wait_procs(list(alive.values()), timeout=grace)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=grace)
