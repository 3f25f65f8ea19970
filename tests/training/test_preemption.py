"""A signal mid-run: every rank finishes the step, checkpoints, exits 75; --resume continues
with the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import launch, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

STEPS = 30


def test_signal_checkpoints_and_resume_matches_straight_run(demo_data, tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    launch(2, [tiny_overrides(demo_data, straight, train__steps=str(STEPS))])

    args = tiny_overrides(demo_data, preempted, train__steps=str(STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "pretrain", "--nproc", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while not (preempted / "metrics.jsonl").exists() or len(read_metrics(preempted)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "nemo_run.core.runners.fdl_runner" in p.cmdline()
               and not any("torchrun" in part or "torch.distributed.run" in part for part in p.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGUSR1)  # one rank only: the others must still stop with it
    output = proc.communicate(timeout=300)[0]

    assert "SIGUSR1: saved step" in output or "a peer rank was signalled: saved step" in output
    stopped = int(output.split(": saved step ")[1].split(",")[0])
    assert 3 <= stopped < STEPS
    assert (preempted / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert max(read_metrics(preempted)) == stopped  # the step in flight finished, none after it

    resumed = subprocess.run([sys.executable, "-m", "kiln.cli", "pretrain", "--nproc", "2", "--resume",
                              *args], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout
    a, b = read_metrics(straight), read_metrics(preempted)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s]["loss"] == b[s]["loss"] for s in a)
