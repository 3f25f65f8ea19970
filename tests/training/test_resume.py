"""Exact resume: 20 straight steps equal 10 steps, a process exit, and 10 resumed steps, in every
loss and in the final weights, with the plain and with the distributed optimizer."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import launch, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

VARIANTS = {
    "tp2_adam": {"parallel.tp": "2"},
    "dp2_distopt": {"parallel.tp": "1", "optimizer.distributed": "true"},
}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")

    def spec(name, variant, **extra):
        fields = {**VARIANTS[variant], "train.steps": "20", **extra}
        return tiny_overrides(demo_data, root / name, **{k.replace(".", "__"): v for k, v in fields.items()})

    first = []
    for v in VARIANTS:
        first.append(spec(f"{v}_straight", v, **{"checkpoint.save_interval": "0"}))
        first.append(spec(f"{v}_split", v,
                          **{"checkpoint.save_interval": "10", "train.stop_after_steps": "10"}))
    launch(2, first)
    # a new launch: nothing survives from the first processes but what the checkpoint holds
    launch(2, [spec(f"{v}_split", v, **{"checkpoint.resume": "true"}) for v in VARIANTS])
    return root


def _final_weights(run_dir):
    from kiln.training import checkpoint

    path = checkpoint.latest(run_dir / "checkpoints")
    tensors = checkpoint.read_tensors(path)
    return path.name, {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumed_losses_equal_straight_run(runs, variant):
    straight = read_metrics(runs / f"{variant}_straight")
    resumed = read_metrics(runs / f"{variant}_split")
    assert sorted(resumed) == sorted(straight) == list(range(1, 21))
    for step in straight:
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["lr"] == straight[step]["lr"], step


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumed_final_weights_equal_straight_run(runs, variant):
    name_a, a = _final_weights(runs / f"{variant}_straight")
    name_b, b = _final_weights(runs / f"{variant}_split")
    assert name_a == name_b == "iter_0000020"
    assert a.keys() == b.keys() and len(a) == 9  # embedding, 6 stacked layer tensors, final norm, output
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_split_run_stopped_at_its_checkpoint(runs):
    """The first half really ended at step 10: its checkpoint is iter 10, then the resume wrote 20."""
    assert (runs / "dp2_distopt_split" / "checkpoints" / "iter_0000010").is_dir()
