"""Artifact directories: atomic writes, the `kiln.json` manifest every stage leaves behind,
and the one place the checkpoint layout is spelled.

The manifest records the stage, kiln's version, the resolved config, each input's
path and content digest, a summary, and start/end times; the pipeline compares
configs and digests to decide whether a stage must run again.

A training run's checkpoints live in `<run_dir>/checkpoints/` (or `checkpoint.dir`):

    iter_0000010/   one megatron-core dist-checkpoint (torch_dist) directory
    latest          the name of the newest complete checkpoint, written last
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kiln
from kiln.errors import CheckpointError

MANIFEST = "kiln.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield `<final>.tmp-<id>` to fill; rename it to `final` only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists; remove it or choose another output")
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# files that identify a dist-checkpoint: its tensor index, and the common state where every save
# records a fresh `save_id`; the shard files themselves enter by name and size only
_CHECKPOINT_IDENTITY = (".metadata", "common.pt", "metadata.json")


def digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's relative paths and file digests (manifest excluded).
    A dist-checkpoint directory is digested by its identity files and its shards' sizes: hashing
    hundreds of GB of shards on every freshness check would cost minutes, and kiln never rewrites
    a checkpoint in place (each save writes a new directory with a new save_id)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()
    checkpoint = (path / ".metadata").is_file() and (path / "common.pt").is_file()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(file.relative_to(path)).encode())
        if checkpoint and file.name not in _CHECKPOINT_IDENTITY:
            h.update(str(file.stat().st_size).encode())
        else:
            h.update(digest(file).encode())
    return h.hexdigest()


def write_manifest(
    directory: str | os.PathLike,
    stage: str,
    config: Any,
    inputs: list[str | os.PathLike],
    summary: dict,
    started: float,
    request: Any = None,
) -> dict:
    """Write `kiln.json` into `directory` (atomically) and return it. `request` is the config as
    given, when the stage resolved it further (the pipeline compares requests to skip reruns)."""
    as_dict = lambda c: dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c  # noqa: E731
    manifest = {
        "stage": stage,
        "kiln_version": kiln.__version__,
        "config": as_dict(config),
        "request": as_dict(request if request is not None else config),
        "inputs": [{"path": str(Path(p).resolve()), "digest": digest(p)} for p in inputs],
        "summary": summary,
        "started": _iso(started),
        "ended": _iso(time.time()),
    }
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ts))


# ---- the checkpoint layout ----


def checkpoints_dir(run_dir: str | os.PathLike) -> str:
    return f"{run_dir}/{CHECKPOINTS}"


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def partial_name(step: int) -> str:
    """Where a save of `step` is written before it is complete (renamed, then marked latest)."""
    return f"{checkpoint_name(step)}.tmp"


def mark_latest(ckpt_dir: str | os.PathLike, name: str) -> None:
    atomic_write_text(Path(ckpt_dir) / LATEST, name + "\n")


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint named by the `latest` marker, or None."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None
    path = Path(ckpt_dir) / marker.read_text().strip()
    if not (path / "metadata.json").exists():
        raise CheckpointError(
            f"{marker} names {path.name}, which is not a complete checkpoint; remove the marker "
            f"to start fresh, or point it at an existing iter_* directory"
        )
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, a checkpoint root (then its latest), or a run directory holding one."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    if (path / CHECKPOINTS).is_dir() and not (path / LATEST).exists():
        path = path / CHECKPOINTS
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no metadata.json) nor a directory with a `latest` marker"
        )
    return found
