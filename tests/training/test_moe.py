"""Mixture of experts on real gloo process groups: expert parallelism (both token dispatchers, and
with TP + sequence parallelism) reproduces the single-process loss curve; aux losses and expert load
are logged; checkpoints resume exactly, survive a SIGKILL, and reshard between EP layouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import RUNS_SCRIPT, free_port, launch, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow  # launches processes (make test-fast skips it)

STEPS = 10
TOLERANCE = 1e-5
# a tiny MoE: 2 layers of 4 experts, top-2, with a z-loss so both aux losses are logged
MOE = {"model.num_layers": "2", "model.hidden_size": "64", "model.ffn_hidden_size": "128",
       "model.moe.num_experts": "4", "model.moe.topk": "2", "model.moe.z_loss_coeff": "0.001",
       "train.seq_length": "64", "train.micro_batch_size": "2", "train.global_batch_size": "8",
       "train.steps": str(STEPS), "checkpoint.save_interval": "0", "logging.log_interval": "5", "parallel.tp": "1"}
EP2 = {"parallel.ep": "2"}
LAYOUTS = {
    # with the distributed optimizer: dense state sharded over DP=2, expert state over expert DP=1
    "ep2_allgather": {**EP2, "parallel.moe_dispatcher": "allgather", "optimizer.distributed": "true"},
    "ep2_alltoall": {**EP2, "parallel.moe_dispatcher": "alltoall", "logging.tensorboard": "true"},
    # 4 processes: experts over EP=2 x expert TP=2, attention over TP=2 with sequence parallelism
    "ep2_tp2_sp": {**EP2, "parallel.tp": "2", "parallel.sequence_parallel": "true"},
}


def spec(data, run_dir, **fields):
    return tiny_overrides(data, run_dir, **{k.replace(".", "__"): v for k, v in {**MOE, **fields}.items()})


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    reference, ep2 = str(root / "reference" / "checkpoints"), str(root / "ep2_alltoall" / "checkpoints")
    launch(2, [
        spec(demo_data, root / "ep2_allgather", **LAYOUTS["ep2_allgather"]),
        spec(demo_data, root / "ep2_alltoall", **LAYOUTS["ep2_alltoall"]),
        spec(demo_data, root / "ep2_split", **LAYOUTS["ep2_allgather"],
             **{"checkpoint.save_interval": "5", "train.stop_after_steps": "5"}),
    ])
    # one process: the reference curve, and each layout's final weights loaded into EP=1
    launch(1, [
        spec(demo_data, root / "reference"),
        spec(demo_data, root / "ep1_from_ep1", **{"train.steps": "3", "checkpoint.load_weights": reference}),
        spec(demo_data, root / "ep1_from_ep2", **{"train.steps": "3", "checkpoint.load_weights": ep2}),
    ])
    resume_across = spec(demo_data, root / "refused", **EP2,
                         **{"checkpoint.resume": "true", "checkpoint.dir": reference})
    with pytest.raises(AssertionError) as refused:  # the last run of the launch must fail, and say why
        launch(2, [
            spec(demo_data, root / "ep2_split", **LAYOUTS["ep2_allgather"], **{"checkpoint.resume": "true"}),
            spec(demo_data, root / "ep2_from_ep2", **EP2, **{"train.steps": "3", "checkpoint.load_weights": ep2}),
            spec(demo_data, root / "ep2_from_ep1", **EP2, **{"train.steps": "3", "checkpoint.load_weights": reference}),
            resume_across,
        ])
    (root / "refused.txt").write_text(str(refused.value))
    launch(4, [spec(demo_data, root / "ep2_tp2_sp", **LAYOUTS["ep2_tp2_sp"])])
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_matches_single_process(runs, layout):
    reference, parallel = read_metrics(runs / "reference"), read_metrics(runs / layout)
    assert sorted(parallel) == list(range(1, STEPS + 1))
    for step, record in reference.items():
        for key in ("loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss"):
            assert abs(parallel[step][key] - record[key]) < TOLERANCE, (layout, step, key)
    assert parallel[STEPS]["loss"] < parallel[1]["loss"] - 0.5  # it learned: equal curves are not flat lines
    # the routing of step 1 (identical initial weights) is the same token for token
    assert parallel[1]["expert_tokens"] == reference[1]["expert_tokens"]


def test_aux_losses_and_expert_load_are_logged(runs):
    record = read_metrics(runs / "ep2_alltoall")[1]
    tokens = 8 * 64  # global batch x sequence
    assert set(record["expert_tokens"]) == {"0", "1"}  # every layer is MoE
    for counts in record["expert_tokens"].values():
        assert len(counts) == 4 and sum(counts) == tokens * 2  # top-2: every token reaches two experts
    imbalance = max(max(c) / (sum(c) / 4) for c in record["expert_tokens"].values())
    assert record["expert_imbalance"] == pytest.approx(imbalance)
    assert set(record["moe_load_balancing_loss_per_layer"]) == set(record["moe_z_loss_per_layer"]) == {"0", "1"}
    # the switch loss of a near-uniform router is about 1 (its minimum); the z-loss is positive
    assert 0.9 < record["moe_load_balancing_loss"] < 1.5 and record["moe_z_loss"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "ep2_alltoall" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"moe_load_balancing_loss", "moe_z_loss", "expert_imbalance", "expert_tokens/1/3",
            "moe_z_loss_per_layer/0"} <= tags


def test_resume_with_ep_is_exact(runs):
    """EP=2 with the distributed optimizer: 5 steps, a new launch, 5 more = 10 straight steps, bitwise."""
    straight, resumed = read_metrics(runs / "ep2_allgather"), read_metrics(runs / "ep2_split")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert (runs / "ep2_split" / "checkpoints" / "iter_0000005").is_dir()
    for step in straight:
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["expert_tokens"] == straight[step]["expert_tokens"], step


@pytest.mark.parametrize("saved, other", [("ep1", "ep2"), ("ep2", "ep1")])
def test_weights_reshard_between_ep_layouts(runs, saved, other):
    """A checkpoint's weights loaded at another EP compute what they compute at the EP they were saved at."""
    same = read_metrics(runs / f"{saved}_from_{saved}")
    moved = read_metrics(runs / f"{other}_from_{saved}")
    assert abs(moved[1]["loss"] - same[1]["loss"]) < 1e-6  # step 1: the loaded weights alone
    assert moved[1]["expert_tokens"] == same[1]["expert_tokens"]
    for step in same:
        assert abs(moved[step]["loss"] - same[step]["loss"]) < TOLERANCE, step


def test_optimizer_state_across_ep1_and_ep2_is_refused(runs):
    message = (runs / "refused.txt").read_text()
    assert "holds optimizer state saved at EP=1, which cannot resume at EP=2" in message
    assert "checkpoint.load_weights=" in message


def test_sigkill_then_resume_matches_straight_run(runs, demo_data, tmp_path):
    """Every rank killed without warning mid-run: the resume starts from the last complete checkpoint
    (a partial one is discarded) and reproduces the uninterrupted run's losses exactly."""
    run = tmp_path / "killed"
    args = spec(demo_data, run, **{**LAYOUTS["ep2_alltoall"], "checkpoint.save_interval": "3",
                                   "logging.tensorboard": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(RUNS_SCRIPT), "tiny", json.dumps([args])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks at once
    proc.wait(timeout=60)
    killed_at = max(read_metrics(run))
    assert killed_at < STEPS and not (run / "checkpoints" / f"iter_{STEPS:07d}").exists()

    launch(2, [args + ["checkpoint.resume=true"]])
    straight, resumed = read_metrics(runs / "ep2_alltoall"), read_metrics(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in straight:
        assert resumed[step]["loss"] == straight[step]["loss"], step
