"""Artifact directories: atomic writes and the `kiln.json` manifest every stage leaves behind.

The manifest records the stage, kiln's version, the resolved config, each input's
path and content digest, a summary, and start/end times; the pipeline compares
configs and digests to decide whether a stage must run again.
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

MANIFEST = "kiln.json"


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


def digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's relative paths and file digests (manifest excluded)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(file.relative_to(path)).encode())
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
