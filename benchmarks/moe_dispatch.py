"""Mixture-of-experts step time on CPU: the two token dispatchers, EP=1 against EP=2, and the
router's overhead against a dense model of equal active parameters.

Models: `tiny_moe` (4 layers, 4 SwiGLU experts of width 192, top-2) and the dense `tiny_llama`
(MLP width 384 = 2 x 192: the same active MLP parameters per token), trained by kiln's own loop.
Data: real text from this machine (benchmarks/prepare.py's corpus: licenses, the Python standard
library, /usr/share/doc, in a fixed order), tokenized by `kiln prepare` with a 2048-token BPE.

All runs share one torchrun launch of 2 processes (world 2: dense and EP=1 are DP=2, EP=2 has the
experts split over the two ranks), in alternating rounds so machine drift hits each alike. Step
time is the median over the steps after warm-up, from each run's metrics.jsonl. Prints each
configuration's step time and the ratios.

    python benchmarks/moe_dispatch.py [--rounds 2] [--steps 12] [--mib 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3  # steps left out of the median: first-step allocations, the dispatcher's first sizes

# name -> overrides of the tiny_moe recipe
RUNS = {
    "dense": {"model.moe": None, "parallel.ep": 1},
    "moe_ep1": {"parallel.ep": 1, "parallel.moe_dispatcher": "alltoall"},
    "moe_ep2_alltoall": {"parallel.ep": 2, "parallel.moe_dispatcher": "alltoall"},
    "moe_ep2_allgather": {"parallel.ep": 2, "parallel.moe_dispatcher": "allgather"},
}


def config(name: str, data: Path, run_dir: Path, steps: int):
    from kiln.config import LoggingConfig
    from kiln.recipes.pretrain import tiny_moe

    cfg = tiny_moe()
    cfg.run_dir = str(run_dir)
    cfg.data.blend = [str(data / "corpus_text_document")]
    cfg.data.tokenizer = str(data / "tokenizer")
    cfg.train.steps = steps
    cfg.train.eval_interval = 0
    cfg.checkpoint.save_interval = 0
    cfg.logging = LoggingConfig(log_interval=10**9, tensorboard=False, progress_bar=False)
    for field, value in RUNS[name].items():
        section, key = field.split(".")
        setattr(getattr(cfg, section), key, value)
    return cfg


def worker(data: Path, work: Path, rounds: int, steps: int) -> None:
    """Under torchrun: every run, round after round, in this one pair of processes."""
    from kiln.bootstrap import quiet_library_warnings
    from kiln.training.pretrain import pretrain

    quiet_library_warnings()
    for r in range(rounds):
        for name in RUNS:
            pretrain(config(name, data, work / f"{name}_{r}", steps))


def step_times(run_dir: Path) -> list[float]:
    times = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "s_per_step" in record and record["step"] > WARMUP:
            times.append(record["s_per_step"])
    return times


def prepare_data(work: Path, mib: float) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from prepare import build_corpus  # the prepare benchmark's deterministic corpus of real text

    from kiln.config import PrepareConfig
    from kiln.data.prepare import prepare

    data = work / "data"
    if not (data / "tokenizer").exists():
        corpus = work / "corpus.jsonl"
        if not corpus.exists():
            build_corpus(corpus, mib)
        prepare(PrepareConfig(inputs=[str(corpus)], output_dir=str(data), vocab_size=2048))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--mib", type=float, default=4)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="kiln-moe-bench-"))).resolve()
    if args.worker:
        return worker(work / "data", work, args.rounds, args.steps)
    work.mkdir(parents=True, exist_ok=True)
    prepare_data(work, args.mib)
    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               __file__, "--worker", "--work", str(work), "--rounds", str(args.rounds), "--steps", str(args.steps)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    median = {name: statistics.median(t for r in range(args.rounds) for t in step_times(work / f"{name}_{r}"))
              for name in RUNS}
    print(f"\nstep time, median of {args.rounds} x {args.steps - WARMUP} steps on 2 processes (work: {work})")
    for name, seconds in median.items():
        print(f"  {name:<20} {seconds * 1000:8.1f} ms")
    print(f"alltoall / allgather dispatcher (EP=2):   {median['moe_ep2_alltoall'] / median['moe_ep2_allgather']:.2f}x")
    print(f"EP=2 / EP=1 (alltoall):                   {median['moe_ep2_alltoall'] / median['moe_ep1']:.2f}x")
    print(f"MoE (EP=1) / dense of equal active params: {median['moe_ep1'] / median['dense']:.2f}x")


if __name__ == "__main__":  # dist_checkpointing's save workers re-import __main__
    main()
