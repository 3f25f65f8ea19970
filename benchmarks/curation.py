"""Curation on CPU against the peers, on one generated corpus.

kiln.curation.synthetic writes documents of a few hundred words with 10% exact copies and 10%
near-duplicates (Jaccard ~0.9). Deduplication at threshold 0.8: kiln's MinHash + LSH (filters
off), datatrove's MinHash pipeline (signatures, buckets, clusters, filter; 2 workers) and
datasketch's MinHashLSH (one process). Quality filters: kiln (NeMo Curator's filters and
fastText language id in kiln's worker pool, dedup off) against datatrove's Gopher quality,
Gopher repetition and C4 filters. Each prints documents per second, peak memory over the
whole process tree (psutil, workers included) and, for dedup, precision and recall on the
planted near-duplicates.

The filter comparison reads the first --filter-documents of the corpus (datatrove's filters
run at ~70 documents/s here, so 50,000 would take most of a quarter hour).

    python benchmarks/curation.py [--documents 50000] [--filter-documents 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import process_tree

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


DATATROVE_DEDUP = r'''
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
if __name__ == "__main__":  # datatrove's worker pool re-imports this file
  src, work, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
  config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
  read = lambda: JsonlReader(src, glob_pattern="*.jsonl", id_key="id", default_metadata={})
  s1 = LocalPipelineExecutor([read(), MinhashDedupSignature(f"{work}/sigs", config=config)], tasks=workers,
                           workers=workers, logging_dir=f"{work}/logs1")
  s2 = LocalPipelineExecutor([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)],
                           tasks=config.num_buckets, workers=workers, logging_dir=f"{work}/logs2", depends=s1)
  s3 = LocalPipelineExecutor([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)], tasks=1,
                           logging_dir=f"{work}/logs3", depends=s2)
  s4 = LocalPipelineExecutor([read(), MinhashDedupFilter(f"{work}/remove"),
                              JsonlWriter(f"{work}/out", compression=None)],
                           tasks=workers, workers=workers, logging_dir=f"{work}/logs4", depends=s3)
  s4.run()
'''

DATATROVE_FILTERS = r'''
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
if __name__ == "__main__":  # datatrove's worker pool re-imports this file
  src, work, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
  LocalPipelineExecutor([JsonlReader(src, glob_pattern="*.jsonl", id_key="id", default_metadata={}),
                         GopherRepetitionFilter(), GopherQualityFilter(),
                         C4QualityFilter(filter_no_terminal_punct=False),
                         JsonlWriter(f"{work}/out", compression=None)],
                        tasks=workers, workers=workers, logging_dir=f"{work}/logs").run()
'''


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB of the process and all its children)."""
    code, seconds, peak = process_tree.run(command, ROOT, poll=0.05, stderr=None)
    if code:
        sys.exit(f"{command} failed")
    return seconds, peak


def scores(kept: set[str], truth: dict, all_ids: set[str]) -> tuple[float, float]:
    near, exact = set(truth["near"]), set(truth["exact"])
    removed = all_ids - kept
    return len(near - kept) / len(near), len(removed & (near | exact)) / max(len(removed), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--filter-documents", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test suite's corpus generator
    from tests.curation.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="kiln-bench-curate-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        truth = generate(corpus / "corpus.jsonl", args.documents, seed=7)
        all_ids = {json.loads(line)["id"] for line in (corpus / "corpus.jsonl").read_text().splitlines()}
        src, w = str(corpus / "corpus.jsonl"), str(args.workers)

        def kiln(out, *fields):
            return [sys.executable, "-m", "kiln.cli", "curate", "--input", src, "--output", str(tmp / out),
                    "--workers", w, *fields]

        def kept_ids(directory: Path) -> set[str]:
            return {json.loads(line)["id"] for p in directory.rglob("*.jsonl") for line in p.read_text().splitlines()}

        dedup, filters = {}, {}
        seconds, peak = measure(kiln("kiln_dedup", "filters.enabled=false"))
        dedup["kiln MinHash+LSH"] = (seconds, peak, *scores(kept_ids(tmp / "kiln_dedup"), truth, all_ids))
        (tmp / "dt_dedup.py").write_text(DATATROVE_DEDUP)
        seconds, peak = measure([sys.executable, str(tmp / "dt_dedup.py"), str(corpus), str(tmp / "dt"), w])
        dedup["datatrove MinHash"] = (seconds, peak, *scores(kept_ids(tmp / "dt" / "out"), truth, all_ids))
        (tmp / "ds.py").write_text(DATASKETCH)
        seconds, peak = measure([sys.executable, str(tmp / "ds.py"), src, str(tmp / "ds.json")])
        dedup["datasketch MinHashLSH"] = (seconds, peak, *scores(set(json.loads((tmp / "ds.json").read_text())),
                                                                 truth, all_ids))
        subset = tmp / "subset"
        subset.mkdir()
        lines = (corpus / "corpus.jsonl").read_text().splitlines(keepends=True)[:args.filter_documents]
        (subset / "corpus.jsonl").write_text("".join(lines))
        src = str(subset / "corpus.jsonl")
        filters["kiln (Curator filters)"] = measure(kiln("kiln_filters", "exact_dedup=false", "fuzzy_dedup=false"))
        (tmp / "dt_filters.py").write_text(DATATROVE_FILTERS)
        filters["datatrove Gopher+C4"] = measure([sys.executable, str(tmp / "dt_filters.py"), str(subset),
                                                  str(tmp / "dtf"), w])
    print(f"fuzzy dedup, {args.documents} documents, threshold 0.8:")
    for name, (seconds, peak, recall, precision) in dedup.items():
        print(f"  {name:<24} {args.documents / seconds:8.0f} docs/s  peak {peak:5.2f} GiB  "
              f"near-dup recall {recall:.3f}  precision {precision:.4f}")
    print(f"quality filters, the first {len(lines)} documents:")
    for name, (seconds, peak) in filters.items():
        print(f"  {name:<24} {len(lines) / seconds:8.0f} docs/s  peak {peak:5.2f} GiB")
    k, d = dedup["kiln MinHash+LSH"], dedup["datatrove MinHash"]
    print(f"kiln / datatrove dedup: {d[0] / k[0]:.2f}x docs/s (target >= 5x), kiln peak {k[1]:.2f} GiB "
          f"(target < 1 GiB); kiln / datasketch: {dedup['datasketch MinHashLSH'][0] / k[0]:.2f}x; "
          f"filters kiln / datatrove: {filters['datatrove Gopher+C4'][0] / filters['kiln (Curator filters)'][0]:.2f}x")


if __name__ == "__main__":
    main()
