"""TP, PP, VPP, DP (distributed optimizer), sequence parallel and TP x PP each reproduce the
single-process loss curve from the same initial weights, over real gloo process groups."""

from __future__ import annotations

import pytest

from tests.conftest import launch, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

STEPS = 10
TOLERANCE = 1e-5

LAYOUTS_2 = {
    "tp2": {"parallel.tp": "2"},
    "pp2": {"parallel.tp": "1", "parallel.pp": "2"},
    "vpp2": {"parallel.tp": "1", "parallel.pp": "2", "parallel.vpp": "2"},
    "dp2_distopt": {"parallel.tp": "1", "optimizer.distributed": "true"},
    "tp2_sp": {"parallel.tp": "2", "parallel.sequence_parallel": "true"},
}
LAYOUTS_4 = {"tp2_pp2": {"parallel.tp": "2", "parallel.pp": "2"}}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    init = root / "init"
    common = {"train.steps": str(STEPS), "checkpoint.save_interval": "0",
              "checkpoint.load_weights": str(init / "checkpoints")}

    def spec(name, layout):
        fields = {**common, **layout}
        return tiny_overrides(demo_data, root / name, **{k.replace(".", "__"): v for k, v in fields.items()})

    # the initial weights: one step of a single-process run, saved as a TP1 checkpoint
    launch(1, [
        tiny_overrides(demo_data, init, parallel__tp="1", train__steps="1", schedule__warmup_steps="0"),
        spec("reference", {"parallel.tp": "1"}),
    ])
    launch(2, [spec(name, layout) for name, layout in LAYOUTS_2.items()])
    launch(4, [spec(name, layout) for name, layout in LAYOUTS_4.items()])
    return root


@pytest.mark.parametrize("layout", [*LAYOUTS_2, *LAYOUTS_4])
def test_loss_curve_matches_single_process(runs, layout):
    reference = read_metrics(runs / "reference")
    parallel = read_metrics(runs / layout)
    assert sorted(parallel) == list(range(1, STEPS + 1))
    for step, record in reference.items():
        assert abs(parallel[step]["loss"] - record["loss"]) < TOLERANCE, (layout, step)
        assert abs(parallel[step]["grad_norm"] - record["grad_norm"]) < 1e-4, (layout, step)
    # the run learned something, so equal curves are not two flat lines
    assert parallel[STEPS]["loss"] < parallel[1]["loss"] - 1.0


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2_pp2"])
def test_tp1_checkpoint_reshards(runs, layout):
    """Step 1's loss is computed before any update: it checks the resharded weights alone."""
    assert abs(read_metrics(runs / layout)[1]["loss"] - read_metrics(runs / "reference")[1]["loss"]) < 1e-6
