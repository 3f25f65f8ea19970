"""A checkpoint directory that fills up: one line naming the path, the space needed and free, and
the checkpoint that is still good; no partial save left behind; a resume after freeing space works.
Runs on a real 20 MB tmpfs (root only: CI and these machines run as root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def kiln(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_a_save_that_does_not_fit_fails_in_one_line_and_keeps_the_last_good_checkpoint(demo_data, tmp_path,
                                                                                       small_disk):
    ckpt_dir = small_disk / "ckpt"
    args = tiny_overrides(demo_data, tmp_path / "run", parallel__tp="1", train__steps="8",
                          checkpoint__save_interval="2", checkpoint__keep_last="1", checkpoint__dir=str(ckpt_dir))
    # a partial save a killed run left behind holds space the next save needs: it is cleaned first
    stale = ckpt_dir / "iter_0000099.tmp"
    stale.mkdir(parents=True)
    (stale / "shard.distcp").write_bytes(b"\0" * (6 << 20))

    out = kiln("pretrain", "--recipe", "tiny", "--nproc", "1", *args)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("kiln:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    message = errors[0]
    assert f"cannot save step 4 to {ckpt_dir}" in message and "MiB free" in message, message
    assert f"{ckpt_dir / 'iter_0000002'} is still the last good checkpoint" in message, message
    assert (ckpt_dir / "latest").read_text().strip() == "iter_0000002"
    assert not list(ckpt_dir.glob("*.tmp")), "a partial save was left on disk"

    # with more room (another directory), the run resumes from the good checkpoint and finishes
    roomy = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", str(ckpt_dir), str(roomy)], check=True)
    args = [a for a in args if not a.startswith("checkpoint.dir=")] + [f"checkpoint.dir={roomy}"]
    out = kiln("pretrain", "--recipe", "tiny", "--nproc", "1", "--resume", *args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "loaded" in out.stdout and "at step 2" in out.stdout
    assert sorted(read_metrics(tmp_path / "run")) == list(range(1, 9))


WRITE_FAILS = """
import sys
from kiln.training import checkpoint
checkpoint._estimate_bytes = lambda chunks, optimizer: 0  # let the pre-check pass: the write itself must fail
checkpoint._size = lambda path: 0
if __name__ == "__main__":  # dist_checkpointing's save workers re-import __main__
    from kiln.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_a_save_that_runs_out_of_space_while_writing_is_removed_and_named(demo_data, tmp_path, small_disk):
    ckpt_dir = small_disk / "ckpt"
    args = tiny_overrides(demo_data, tmp_path / "run", parallel__tp="1", train__steps="6",
                          checkpoint__save_interval="2", checkpoint__dir=str(ckpt_dir))
    script = tmp_path / "write_fails.py"
    script.write_text(WRITE_FAILS)
    out = subprocess.run([sys.executable, str(script), "pretrain", "--recipe", "tiny", "--nproc", "1", *args],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("kiln:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "while writing" in errors[0] and "is still the last good checkpoint" in errors[0], errors[0]
    latest = (ckpt_dir / "latest").read_text().strip()
    assert (ckpt_dir / latest / "metadata.json").exists()
    assert not list(ckpt_dir.glob("*.tmp"))
    assert Path(ckpt_dir).stat().st_dev != Path(tmp_path).stat().st_dev  # it really ran on the small disk
