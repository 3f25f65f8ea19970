"""`kiln curate engine=ray`: the same curation as the local engine, as tasks on a Ray cluster.

Tasks exchange files under the work directory (shared storage), never Ray's object store:

1. map, one task per contiguous input split: read, normalize, filter, redact, digest, MinHash.
   It writes the split's documents (docs.jsonl + byte offsets), per row the filter verdict,
   text size, digest and signature, and its shuffle entries sorted by bucket: (digest, id) for
   exact dedup, (band, band key, id) for LSH.
2. reduce, one task per bucket. Exact: the first id of a digest is kept. Fuzzy: documents
   sharing a band key are candidates of the group's first id, kept as an edge when their
   signatures agree on at least the threshold (the local engine's rule, pair for pair).
3. components, on the driver: union of the edges (scipy), the cluster's first id is kept.
4. write, one task per output shard, whose boundaries follow from the kept documents' sizes.

A document's id packs (split index, row in split), which orders documents as one sequential
reader would, so every choice (a cluster's head, the document kept) is fixed by the input
and the output is the local engine's, byte for byte, for any number of nodes or splits.
Exact duplicates also enter the LSH shuffle (the map runs before exact dedup is known): each
has its keeper, which precedes it, in every group it is in, with the same signature, so its
edges mirror its keeper's and change no cluster of surviving documents; the figures count
only documents exact dedup left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from kiln.config import CurateConfig
from kiln.curation import dedup
from kiln.curation.io import BadInput, Document, input_files, read_documents, shard_ends, shard_name, write_shard
from kiln.curation.report import build_report
from kiln.curation.screen import process_texts
from kiln.data import splits as input_splits
from kiln.ray import tasks as ray_tasks
from kiln.ray.connect import connected

CHUNK = 512  # documents per process_texts call inside a map task
_EXACT = np.dtype([("d0", "<u8"), ("d1", "<u8"), ("id", "<i8")])  # a 16-byte digest as two words


def work_dir(cfg: CurateConfig) -> Path:
    return Path(cfg.ray.work_dir or f"{Path(cfg.output_dir).absolute()}.work")


def run_on_ray(cfg: CurateConfig, out: Path, started: float) -> dict:
    """Curate on the cluster; shards land in `out` (the output's temp dir). Returns the report."""
    work = work_dir(cfg)
    splits = input_splits.plan(input_files(cfg.inputs), int(cfg.ray.split_mb * 2**20))
    _claim(work, cfg, splits)
    seconds, phases = {}, {}
    with connected(cfg.ray, cfg.workers) as address:
        retries = cfg.ray.max_task_retries
        maps, phases["map"] = ray_tasks.run("curate map", [
            ray_tasks.Task(f"map-{i:05d}", str(split), map_split, (cfg, i, split, str(work)))
            for i, split in enumerate(splits)], work, retries, counter="documents")
        seconds["map"] = phases["map"].seconds
        docs = sum(m["documents"] for m in maps)
        if docs == 0:
            bad = _merge_bad(maps)
            raise ValueError(f"no usable documents in {cfg.inputs}: {dict(bad.counts)} (see the report's examples)")
        reduce_tasks = []
        for b in range(cfg.ray.buckets):
            if cfg.exact_dedup:
                reduce_tasks.append(ray_tasks.Task(f"exact-{b:04d}", f"exact bucket {b}", reduce_exact,
                                                   (b, len(splits), str(work))))
            if cfg.fuzzy_dedup:
                reduce_tasks.append(ray_tasks.Task(f"fuzzy-{b:04d}", f"LSH bucket {b}", reduce_fuzzy,
                                                   (cfg, b, len(splits), str(work))))
        _, phases["reduce"] = ray_tasks.run("curate reduce", reduce_tasks, work, retries)
        seconds["reduce"] = phases["reduce"].seconds
        tic = time.perf_counter()
        kept_ids, sizes, figures = _components(cfg, work, len(splits), cfg.ray.buckets)
        seconds["components"] = time.perf_counter() - tic
        ends = shard_ends(sizes, int(cfg.shard_mb * 2**20))
        names = [shard_name(j, cfg.output_format) for j in range(len(ends))]
        bounds = [0, *ends]
        _, phases["write"] = ray_tasks.run("curate write", [
            ray_tasks.Task(f"write-{j:05d}", names[j], write_output_shard,
                           (cfg, names[j], kept_ids[bounds[j]:bounds[j + 1]], str(work)))
            for j in range(len(ends))], work, retries, counter="documents")
        seconds["write"] = phases["write"].seconds
    for name in names:
        os.replace(work / "write" / name, out / name)
    report = _report(cfg, maps, figures, len(kept_ids), names, seconds, started)
    report["engine"] = {"name": "ray", "address": address, "splits": len(splits), "buckets": cfg.ray.buckets,
                        "phases": {k: v.as_dict() for k, v in phases.items()},
                        "nodes": len(set().union(*(v.nodes for v in phases.values())))}
    shutil.rmtree(work)
    return report


def _claim(work: Path, cfg: CurateConfig, splits: list) -> None:
    fields = dataclasses.asdict(cfg)
    for name in ("output_dir", "workers", "engine"):
        fields.pop(name)
    fields["ray"] = {k: v for k, v in fields["ray"].items() if k in ("split_mb", "buckets")}
    ray_tasks.claim(work, {"config": fields, "inputs": ray_tasks.input_stats(input_files(cfg.inputs)),
                           "splits": [dataclasses.astuple(s) for s in splits]}, "curate")


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _scratch(final: Path) -> Path:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    return tmp


def map_split(cfg: CurateConfig, index: int, split, work: str) -> dict:
    final = Path(work) / "map" / f"{index:05d}"
    tmp = _scratch(final)
    bad, pii, languages, removed_by = BadInput(), Counter(), Counter(), Counter()
    offsets, sizes, kept, digests, sigs = [0], [], [], [], []
    bytes_in = bytes_out = 0
    batch: list[Document] = []
    with open(tmp / "docs.jsonl", "wb") as f:
        def flush():
            nonlocal bytes_in, bytes_out
            for doc, (text, digest, sig, counts, rejected, language) in zip(
                    batch, process_texts([d.text for d in batch], cfg), strict=True):
                if language:
                    languages[language] += 1
                pii.update(counts)
                bytes_in += len(doc.text.encode())
                size = len(text.encode())
                bytes_out += size
                digests.append(digest)
                if sig is not None:
                    sigs.append(sig)
                if rejected is None:
                    f.write(json.dumps({"id": doc.id, "source": doc.source, "text": text},
                                       ensure_ascii=False).encode() + b"\n")
                else:
                    removed_by[rejected] += 1
                kept.append(rejected is None)
                sizes.append(size)
                offsets.append(f.tell())
            batch.clear()

        for doc in read_documents(cfg, bad, [split]):
            batch.append(doc)
            if len(batch) == CHUNK:
                flush()
        flush()
    n = len(sizes)
    ids = (np.int64(index) << np.int64(32)) + np.arange(n, dtype=np.int64)
    keep = np.array(kept, dtype=bool)
    np.savez(tmp / "rows.npz", offsets=np.array(offsets, dtype=np.int64), sizes=np.array(sizes, dtype=np.int64),
             keep=keep)
    buckets = _BucketsOf(cfg)
    if cfg.exact_dedup:
        words = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)[keep]
        exact = np.empty(len(words), dtype=_EXACT)
        exact["d0"], exact["d1"], exact["id"] = words[:, 0], words[:, 1], ids[keep]
        buckets.save(tmp / "exact", exact, buckets.of_digest(exact))
    if cfg.fuzzy_dedup:
        signatures = np.stack(sigs) if n else np.zeros((0, cfg.num_perm), np.uint32)
        np.save(tmp / "sigs.npy", signatures)
        bands = buckets.band_entries(signatures[keep], ids[keep])
        buckets.save(tmp / "bands", bands, buckets.of_band(bands))
    _publish(tmp, final)
    return {"documents": n, "bytes_in": bytes_in, "bytes_out": bytes_out, "pii": dict(pii),
            "languages": dict(languages), "removed_by": dict(removed_by),
            "bad": {"counts": dict(bad.counts), "examples": bad.examples}}


class _BucketsOf:
    """Which reduce task an entry goes to, and the per-split files sorted by bucket."""

    def __init__(self, cfg: CurateConfig):
        self.n = cfg.ray.buckets
        self.bands, self.rows = dedup.lsh_params(cfg.jaccard_threshold, cfg.num_perm)
        self.dtype = np.dtype([("band", "<u2"), ("key", "<u4", (self.rows,)), ("id", "<i8")])

    def of_digest(self, entries: np.ndarray) -> np.ndarray:
        return entries["d0"] % np.uint64(self.n)

    def band_entries(self, signatures: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids) * self.bands, dtype=self.dtype)
        for band in range(self.bands):
            part = out[band::self.bands]
            part["band"], part["id"] = band, ids
            part["key"] = signatures[:, band * self.rows:(band + 1) * self.rows]
        return out

    def of_band(self, entries: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (entries["key"][:, 0].astype(np.uint64) + entries["band"].astype(np.uint64)
                    * np.uint64(0x9E3779B1)) % np.uint64(self.n)

    def save(self, stem: Path, entries: np.ndarray, bucket: np.ndarray) -> None:
        order = np.argsort(bucket, kind="stable")
        np.save(f"{stem}.npy", entries[order])
        np.save(f"{stem}_bounds.npy", np.searchsorted(bucket[order], np.arange(self.n + 1)))


def _bucket(work: Path, name: str, bucket: int, n_splits: int) -> np.ndarray:
    parts = []
    for i in range(n_splits):
        entries = np.load(work / "map" / f"{i:05d}" / f"{name}.npy", mmap_mode="r")
        bounds = np.load(work / "map" / f"{i:05d}" / f"{name}_bounds.npy")
        parts.append(np.asarray(entries[bounds[bucket]:bounds[bucket + 1]]))
    return np.concatenate(parts)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(tmp, array)
    os.replace(tmp, path)


def reduce_exact(bucket: int, n_splits: int, work: str) -> dict:
    """Ids removed as exact copies: all but the first of each digest."""
    entries = _bucket(Path(work), "exact", bucket, n_splits)
    entries = entries[np.lexsort((entries["id"], entries["d1"], entries["d0"]))]
    first = np.ones(len(entries), dtype=bool)
    first[1:] = (entries["d0"][1:] != entries["d0"][:-1]) | (entries["d1"][1:] != entries["d1"][:-1])
    removed = entries["id"][~first]
    _save(Path(work) / "exact" / f"{bucket:04d}.npy", removed)
    keepers = np.cumsum(first)[~first]  # the group each copy belongs to
    return {"removed": len(removed), "clusters": len(np.unique(keepers))}


def reduce_fuzzy(cfg: CurateConfig, bucket: int, n_splits: int, work: str) -> dict:
    """Candidate edges (group head, member) whose signatures agree on >= the threshold."""
    entries = _bucket(Path(work), "bands", bucket, n_splits)
    key = np.concatenate([entries["band"][:, None].astype("<u4"), entries["key"]], axis=1)
    order = np.lexsort((entries["id"], *key.T[::-1]))
    entries, key = entries[order], key[order]
    new_group = np.ones(len(entries), dtype=bool)
    new_group[1:] = (key[1:] != key[:-1]).any(axis=1)
    head = entries["id"][np.flatnonzero(new_group)[np.cumsum(new_group) - 1]]
    member = ~new_group
    heads, others = head[member], entries["id"][member]
    if len(heads):
        lookup = _Signatures(Path(work))
        agree = (lookup(others) == lookup(heads)).mean(axis=1)
        keep = agree >= cfg.jaccard_threshold
        heads, others = heads[keep], others[keep]
    _save(Path(work) / "fuzzy" / f"{bucket:04d}.npy", np.stack([heads, others], axis=1))
    return {"edges": len(heads)}


class _Signatures:
    """Signature rows by id, read from each split's memory-mapped sigs.npy."""

    def __init__(self, work: Path):
        self.work, self.maps = work, {}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        split, row = ids >> 32, ids & 0xFFFFFFFF
        out = None
        for s in np.unique(split):
            if s not in self.maps:
                self.maps[s] = np.load(self.work / "map" / f"{s:05d}" / "sigs.npy", mmap_mode="r")
            where = split == s
            rows = self.maps[s][row[where]]
            out = np.empty((len(ids), rows.shape[1]), rows.dtype) if out is None else out
            out[where] = rows
        return out


def _components(cfg: CurateConfig, work: Path, n_splits: int, buckets: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The kept ids in order, their text sizes, and the dedup figures. Runs on the driver: the
    one step whose memory grows with the corpus (8 bytes per edge, 17 per document)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    def load(kind: str) -> np.ndarray:
        return np.concatenate([np.load(work / kind / f"{b:04d}.npy") for b in range(buckets)])

    exact_removed = np.sort(load("exact")) if cfg.exact_dedup else np.zeros(0, np.int64)
    ids, sizes, keep = [], [], []
    for i in range(n_splits):
        rows = np.load(work / "map" / f"{i:05d}" / "rows.npz")
        ids.append((np.int64(i) << np.int64(32)) + np.arange(len(rows["sizes"]), dtype=np.int64))
        sizes.append(rows["sizes"])
        keep.append(rows["keep"])
    ids, sizes, keep = np.concatenate(ids), np.concatenate(sizes), np.concatenate(keep)
    after_filters = int(keep.sum())
    keep &= ~np.isin(ids, exact_removed)
    figures = {"filters": {"docs_in": len(ids), "removed": len(ids) - after_filters},
               "exact": {"docs_in": after_filters, "removed": len(exact_removed),
                         "clusters": sum(json.loads((work / "done" / f"exact-{b:04d}.json").read_text())["clusters"]
                                         for b in range(buckets)) if cfg.exact_dedup else 0},
               "fuzzy": {}, "fuzzy_sizes": Counter()}
    alive = int(keep.sum())
    edges = load("fuzzy").reshape(-1, 2) if cfg.fuzzy_dedup else np.zeros((0, 2), np.int64)
    if cfg.fuzzy_dedup and alive and len(edges):
        nodes, compact = np.unique(edges, return_inverse=True)
        compact = compact.reshape(-1, 2)
        graph = coo_matrix((np.ones(len(compact)), (compact[:, 0], compact[:, 1])), shape=(len(nodes),) * 2)
        _, label = connected_components(graph, directed=False)
        root = np.full(label.max() + 1, len(nodes))
        np.minimum.at(root, label, np.arange(len(nodes)))  # nodes are sorted: the smallest is the first document
        survivor = ~np.isin(nodes, exact_removed)
        members = np.bincount(label[survivor], minlength=len(root))
        dropped = nodes[survivor & (root[label] != np.arange(len(nodes)))]
        keep &= ~np.isin(ids, dropped)
        figures["fuzzy"] = {"docs_in": alive, "removed": len(dropped), "clusters": int((members > 1).sum())}
        figures["fuzzy_sizes"] = Counter(members[members > 1].tolist())
    elif cfg.fuzzy_dedup and alive:
        figures["fuzzy"] = {"docs_in": alive, "removed": 0, "clusters": 0}
    return ids[keep], sizes[keep], figures


def write_output_shard(cfg: CurateConfig, name: str, ids: np.ndarray, work: str) -> dict:
    work = Path(work)
    documents = []
    for s in np.unique(ids >> 32):
        rows = ids[(ids >> 32) == s] & 0xFFFFFFFF
        offsets = np.load(work / "map" / f"{s:05d}" / "rows.npz")["offsets"]
        with open(work / "map" / f"{s:05d}" / "docs.jsonl", "rb") as f:
            for row in rows:
                f.seek(offsets[row])
                record = json.loads(f.read(offsets[row + 1] - offsets[row]))
                documents.append(Document(record["id"], record["source"], record["text"]))
    final = work / "write" / name
    final.parent.mkdir(exist_ok=True)
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    write_shard(tmp, documents, cfg.output_format)
    os.replace(tmp, final)
    return {"documents": len(documents), "sha256": hashlib.sha256(final.read_bytes()).hexdigest()}


def _merge_bad(maps: list[dict]) -> BadInput:
    bad = BadInput()
    for m in maps:
        bad.counts.update(m["bad"]["counts"])
        bad.examples += m["bad"]["examples"][:20 - len(bad.examples)]
    return bad


def _report(cfg, maps, figures, kept, names, seconds, started) -> dict:
    stats = {"read": Counter(docs=sum(m["documents"] for m in maps), bytes=sum(m["bytes_in"] for m in maps)),
             "normalize": Counter(bytes_out=sum(m["bytes_out"] for m in maps)),
             "exact_dedup": Counter(figures["exact"]), "fuzzy_dedup": Counter(figures["fuzzy"]),
             "gpu_dedup": Counter(), "filters": Counter(figures["filters"])}
    pii, languages, removed_by = Counter(), Counter(), Counter()
    for m in maps:
        pii.update(m["pii"])
        languages.update(m["languages"])
        removed_by.update(m["removed_by"])
    return build_report(cfg, stats, seconds, _merge_bad(maps), pii, figures["fuzzy_sizes"], removed_by, languages,
                        kept, names, started)
