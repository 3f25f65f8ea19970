"""DPO step time with the reference log-probabilities cached (one scoring pass before
training) against computing them on the fly with a frozen copy of the model each step.

Runs `kiln dpo` on the tiny model and the demo preference set, from the same start weights,
both ways; prints the median step time of each, the one-time cost of the cache, and the
ratio. Needs the demo artifacts (`make demo`).

    python benchmarks/dpo_reference.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(reference: str, out: Path, steps: int) -> tuple[list[dict], float]:
    args = [sys.executable, "-m", "kiln.cli", "dpo", "--recipe", "tiny", f"run_dir={out}",
            f"dpo.reference={reference}", f"train.steps={steps}", "train.eval_interval=0", "logging.log_interval=1",
            "logging.tensorboard=false", "logging.progress_bar=false", "checkpoint.save_interval=0"]
    tic = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not (ROOT / "runs/demo/sft/checkpoints/latest").exists():
        sys.exit("needs the demo SFT model: run `make demo` first")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-dpo-") as tmp:
        results = {}
        for reference in ("cached", "online"):
            metrics, wall = run(reference, Path(tmp) / reference, args.steps)
            step = statistics.median(m["s_per_step"] for m in metrics[1:])
            results[reference] = (step, wall, metrics[-1]["loss"])
            print(f"{reference:>6}: {step:.3f} s/step (median), {wall:.1f} s wall for {args.steps} steps, "
                  f"final loss {metrics[-1]['loss']:.4f}")
    (cached, cached_wall, a), (online, online_wall, b) = results["cached"], results["online"]
    print(f"online / cached step time: {online / cached:.2f}x; the cache's one-time pass costs about "
          f"{max(0.0, cached_wall - online_wall + (online - cached) * args.steps):.1f} s; "
          f"same losses: {abs(a - b) < 1e-4}")


if __name__ == "__main__":
    main()
