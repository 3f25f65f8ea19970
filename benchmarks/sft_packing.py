"""SFT throughput with sequence packing against one example per padded sequence.

A synthetic instruction set with a realistic length mix (log-normal: many short exchanges, a
few long ones) trains the tiny Llama on CPU, once packed and once padded, for one epoch with
the same number of optimizer steps: the padded run's global batch holds as many examples as
the packed run's, so both take the same updates on the same data and their final losses per
supervised token are comparable. Throughput counts supervised
tokens (the assistant tokens the loss is taken on) per second. Target: packed >= 2x padded.

    python benchmarks/sft_packing.py [--examples 600] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the potter carried a blue jar to the harbour and the baker sold bread at the market while rain "
         "fell on the old mill and the river").split()


def write_data(path: Path, count: int, seed: int = 3) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            n = min(220, max(4, int(rng.lognormvariate(2.8, 0.8))))  # median ~16 words, tail to 220
            question = " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
            answer = " ".join(rng.choices(WORDS, k=n))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def supervised_tokens_per_sample(data: Path, tokenizer: Path, seq: int, packing: bool) -> tuple[float, int]:
    from kiln.data.chat import ChatFormatter
    from kiln.data.records import DataReport
    from kiln.data.sft import encode_file, pack
    from kiln.data.tokenizer import load

    examples = encode_file(str(data), ChatFormatter(load(tokenizer), "chatml"), seq, DataReport(), False)
    samples = pack(examples, seq) if packing else [[e] for e in examples]
    tokens = sum(sum(e.loss_mask[1:]) for s in samples for e in s)
    return tokens / len(samples), len(samples)


def run(mode: str, data: Path, tokenizer: Path, out: Path, steps: int, gbs: int) -> list[dict]:
    args = [sys.executable, "-m", "kiln.cli", "sft", "--recipe", "tiny", f"run_dir={out}", f"data.train={data}",
            "data.valid=null", f"data.tokenizer={tokenizer}", f"data.packing={'true' if mode == 'packed' else 'false'}",
            "checkpoint.load_weights=null", f"train.steps={steps}", f"train.global_batch_size={gbs}",
            "train.eval_interval=0",
            "logging.log_interval=1", "logging.tensorboard=false", "logging.progress_bar=false",
            "checkpoint.save_interval=0", "optimizer.lr=1e-3", "optimizer.min_lr=1e-3"]
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    from kiln.bootstrap import quiet_library_warnings
    from kiln.data.tokenizer import train_bpe

    quiet_library_warnings()
    seq, mbs = 256, 4  # the tiny SFT recipe's
    with tempfile.TemporaryDirectory(prefix="kiln-bench-sft-") as tmp:
        tmp = Path(tmp)
        corpus = [json.loads(x)["text"] for x in (ROOT / "data/demo/corpus.jsonl").read_text().splitlines()]
        train_bpe(corpus, 2048, tmp / "tokenizer")
        write_data(tmp / "sft.jsonl", args.examples)
        results = {}
        counts = {mode: supervised_tokens_per_sample(tmp / "sft.jsonl", tmp / "tokenizer", seq, mode == "packed")
                  for mode in ("packed", "padded")}
        steps = max(4, round(args.epochs * counts["packed"][1] / 8))
        for mode in ("packed", "padded"):
            per_sample, samples = counts[mode]
            gbs = max(mbs, round(samples / steps / mbs) * mbs)
            metrics = run(mode, tmp / "sft.jsonl", tmp / "tokenizer", tmp / mode, steps, gbs)
            timed = [m["s_per_step"] for m in metrics[2:]]  # skip warm-up steps
            seconds = sum(timed) / len(timed)
            results[mode] = {"samples": samples, "steps": steps, "s_per_step": seconds,
                             "supervised_tokens_per_s": per_sample * gbs / seconds,
                             "final_loss": sum(m["loss"] for m in metrics[-3:]) / 3}
            r = results[mode]
            print(f"{mode:>6}: {samples} sequences of {seq}, {steps} steps of {gbs}, {r['s_per_step']:.3f} s/step, "
                  f"{r['supervised_tokens_per_s']:.0f} supervised tokens/s, loss/token {r['final_loss']:.3f}")
    ratio = results["packed"]["supervised_tokens_per_s"] / results["padded"]["supervised_tokens_per_s"]
    print(f"packing speed-up: {ratio:.2f}x supervised tokens/s (target >= 2x); loss per token packed "
          f"{results['packed']['final_loss']:.3f} vs padded {results['padded']['final_loss']:.3f} "
          f"after the same updates on the same data")


if __name__ == "__main__":
    main()
