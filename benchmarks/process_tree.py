"""A benchmark's command in a fresh process: wall seconds and the peak RSS of its whole process tree
(workers and threads' processes included), shared by the benchmarks that compare tools end to end."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil


def run(command: list[str], cwd: Path, stdout=subprocess.DEVNULL, env: dict | None = None,
        cores: set[int] | None = None, poll: float = 0.02, stderr=subprocess.STDOUT) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in GiB summed over the process and its children), pinned
    to `cores` when given."""
    tic = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = psutil.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr, env={**os.environ, **(env or {})},
                        preexec_fn=pin)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(poll)
    return proc.returncode, time.perf_counter() - tic, peak / 2**30
