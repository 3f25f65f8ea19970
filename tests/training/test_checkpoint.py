"""Checkpoint markers: only a complete checkpoint named by `latest` is ever resumed."""

from __future__ import annotations

import pytest

from kiln.training import checkpoint as ckpt


def fake_checkpoint(root, step):
    path = root / ckpt.name(step)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    return path


def test_no_marker_means_fresh_start(tmp_path):
    fake_checkpoint(tmp_path, 10)
    assert ckpt.latest(tmp_path) is None


def test_marker_names_the_checkpoint_and_half_written_ones_are_ignored(tmp_path):
    done = fake_checkpoint(tmp_path, 10)
    (tmp_path / "iter_0000020.tmp").mkdir()  # a save that crashed before its rename
    (tmp_path / "latest").write_text("iter_0000010\n")
    assert ckpt.latest(tmp_path) == done
    assert ckpt.resolve(tmp_path) == done
    assert ckpt.resolve(done) == done


def test_marker_to_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("iter_0000030\n")
    with pytest.raises(ckpt.CheckpointError, match="iter_0000030, which is not a complete checkpoint"):
        ckpt.latest(tmp_path)


def test_resolve_rejects_a_plain_directory(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        ckpt.resolve(tmp_path)


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 10, 15):
        fake_checkpoint(tmp_path, step)
    ckpt._prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", "iter_0000015"]
