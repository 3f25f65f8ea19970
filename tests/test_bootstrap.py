"""Process start-up: when a progress bar is shown."""

from __future__ import annotations

import os

from kiln.bootstrap import interactive


def test_a_slurm_tasks_pseudo_terminal_is_not_a_person(monkeypatch):
    leader, follower = os.openpty()  # what srun gives a task under SLURM_UNBUFFEREDIO
    with os.fdopen(follower, "w") as tty:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        monkeypatch.setenv("TERM", "xterm")
        assert interactive(tty)
        monkeypatch.setenv("SLURM_JOB_ID", "42")
        assert not interactive(tty)
    os.close(leader)


def test_a_file_is_not_a_terminal(tmp_path):
    with open(tmp_path / "log", "w") as f:
        assert not interactive(f)
