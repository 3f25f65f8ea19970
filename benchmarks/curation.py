"""Fuzzy deduplication on CPU: kiln's MinHash + LSH against datasketch's MinHashLSH.

A generated corpus (kiln.curation.synthetic: a few hundred words per document, 10% exact
copies, 10% near-duplicates at Jaccard ~0.9) is deduplicated at threshold 0.8 by each; both
report documents per second, peak memory over the whole process tree (sampled with psutil,
worker processes included) and precision/recall on the planted near-duplicates. datatrove's
MinHash pipeline, the issue's other peer, is not installed here (see README).

    python benchmarks/curation.py [--documents 50000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

DATASKETCH = r'''
import json, sys
from datasketch import MinHash, MinHashLSH
lsh, kept = MinHashLSH(threshold=0.8, num_perm=128), []
for line in open(sys.argv[1]):
    rec = json.loads(line)
    words = rec["text"].lower().split()
    m = MinHash(num_perm=128)
    m.update_batch([" ".join(words[i:i + 5]).encode() for i in range(max(len(words) - 4, 1))])
    if lsh.query(m):
        continue
    lsh.insert(rec["id"], m)
    kept.append(rec["id"])
json.dump(kept, open(sys.argv[2], "w"))
'''


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB of the process and all its children)."""
    tic = time.perf_counter()
    proc = psutil.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        sys.exit(f"{command} failed")
    return time.perf_counter() - tic, peak / 2**30


def scores(kept: set[str], truth: dict, all_ids: set[str]) -> tuple[float, float]:
    near, exact = set(truth["near"]), set(truth["exact"])
    removed = all_ids - kept
    return len(near - kept) / len(near), len(removed & (near | exact)) / max(len(removed), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from kiln.curation.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="kiln-bench-curate-") as tmp:
        tmp = Path(tmp)
        truth = generate(tmp / "corpus.jsonl", args.documents, seed=7)
        all_ids = {json.loads(line)["id"] for line in (tmp / "corpus.jsonl").read_text().splitlines()}
        results = {}
        seconds, peak = measure([sys.executable, "-m", "kiln.cli", "curate", "--input", str(tmp / "corpus.jsonl"),
                                 "--output", str(tmp / "kiln"), "--workers", str(args.workers)])
        kept = {json.loads(line)["id"] for p in (tmp / "kiln").glob("curated_*.jsonl")
                for line in p.read_text().splitlines()}
        results["kiln (exact + fuzzy)"] = (seconds, peak, *scores(kept, truth, all_ids))
        (tmp / "ds.py").write_text(DATASKETCH)
        seconds, peak = measure([sys.executable, str(tmp / "ds.py"), str(tmp / "corpus.jsonl"), str(tmp / "ds.json")])
        kept = set(json.loads((tmp / "ds.json").read_text()))
        results["datasketch MinHashLSH"] = (seconds, peak, *scores(kept, truth, all_ids))
    for name, (seconds, peak, recall, precision) in results.items():
        print(f"{name:<24} {args.documents / seconds:8.0f} docs/s  peak {peak:5.2f} GiB  "
              f"near-dup recall {recall:.3f}  precision {precision:.4f}")
    k, d = results["kiln (exact + fuzzy)"], results["datasketch MinHashLSH"]
    print(f"kiln / datasketch: {d[0] / k[0]:.2f}x docs/s; kiln peak memory {k[1]:.2f} GiB (target < 1 GiB)")


if __name__ == "__main__":
    main()
