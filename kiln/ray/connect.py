"""Connect a stage's driver to the Ray cluster it runs on, failing before any work when it can't.

The address comes from `ray.address`, else $RAY_ADDRESS; without either kiln starts a local
cluster (kiln.ray.local) and stops every process of it at the end. What goes wrong first with
a named cluster is said in one line with the fix: nothing listening at the address, a stale
address file left on this machine by a killed cluster ("auto"), or a cluster of another Ray or
Python version.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from kiln.config import RayConfig
from kiln.errors import ConfigError

# Ray writes the address of the cluster `ray start` last started on this machine here
ADDRESS_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


@contextlib.contextmanager
def connected(cfg: RayConfig, default_cpus: int) -> Iterator[str]:
    """ray.init'ed for the block; yields the cluster's address."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60's token auth hangs clients of a local cluster
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        address = resolve(address, "ray.address" if cfg.address else "$RAY_ADDRESS")
        _init(address)
        try:
            yield address
        finally:
            ray.shutdown()
        return
    from kiln.ray.local import ray_cluster

    with ray_cluster(cfg.num_cpus or default_cpus):
        address = os.environ["RAY_ADDRESS"]
        _init(address)
        try:
            yield address
        finally:
            ray.shutdown()


def resolve(address: str, source: str) -> str:
    """The address to connect to, after checking something listens there."""
    if address == "auto":
        if not ADDRESS_FILE.exists():
            raise ConfigError(f"{source}=auto: no Ray cluster was started on this machine ({ADDRESS_FILE} is "
                              f"missing): run `ray start --head`, give its host:port, or leave ray.address unset "
                              f"and kiln starts one")
        address = ADDRESS_FILE.read_text().strip()
        if not any("raylet" in (p.info["name"] or "") for p in psutil.process_iter(["name"])):
            raise ConfigError(f"{source}=auto: {ADDRESS_FILE} names {address}, but no raylet runs on this "
                              f"machine: the file is stale, left by a cluster that was killed; delete it, start a "
                              f"cluster with `ray start --head`, or leave ray.address unset and kiln starts one")
    if address.startswith("ray://"):
        host_port = address[len("ray://"):]
    else:
        host_port = address
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{source}={address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"{source}={address}: nothing answers there ({exc.strerror or exc}); start the cluster "
                          f"(`ray start --head --port {port}`), fix the address, or unset it and kiln starts a "
                          f"local one") from None
    return address


def _init(address: str) -> None:
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except RuntimeError as exc:
        if "Version mismatch" in str(exc):
            detail = " ".join(str(exc).split())
            raise ConfigError(f"the Ray cluster at {address} runs another Ray or Python version than this driver "
                              f"({detail}); install the cluster's versions here (kiln pins ray with NeMo "
                              f"Curator) or start the cluster from this environment") from None
        raise
    except ConnectionError as exc:
        raise ConfigError(f"could not join the Ray cluster at {address}: {exc}; check that it is up and that "
                          f"this machine can reach every node") from None
