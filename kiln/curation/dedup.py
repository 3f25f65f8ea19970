"""Exact and fuzzy deduplication on CPU: content hashes, and MinHash + LSH + connected components.

NeMo Curator 1.4.0's dedup workflows need cuDF (GPU) and datatrove's MinHash reaches a few
hundred documents per second here, so kiln computes signatures itself, vectorized with numpy:

- a shingle is `ngram` consecutive lowercase words, hashed to 64 bits (a polynomial over
  per-word CRC32 pairs: deterministic across processes, unlike Python's `hash`);
- permutation i maps a shingle hash h to the high 32 bits of ((h XOR b_i) * a_i) mod 2^64
  (multiply-shift hashing), and the signature keeps each permutation's minimum;
- LSH splits the signature into bands of rows chosen for the Jaccard threshold (weighted toward
  recall); documents sharing a band bucket are candidates, a candidate pair is kept when the
  signatures agree on at least `threshold` of their entries, and union-find joins the pairs
  into clusters. The first document of a cluster (input order) is kept: the result does not
  depend on the number of worker processes.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

_PRIME = np.uint64(1_099_511_628_211)  # FNV-64 prime: mixes word hashes into a shingle hash


def permutations(num_perm: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    data = word.encode()
    return (zlib.crc32(data) << 32) | zlib.crc32(data, 0x9E3779B9)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    words = text.lower().split()
    hashes = np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    if len(hashes) < ngram:  # a short document is one shingle
        ngram = max(len(hashes), 1)
        if not len(hashes):
            return np.zeros(1, dtype=np.uint64)
    count = len(hashes) - ngram + 1
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(ngram):
            acc = acc * _PRIME + hashes[j:j + count]
    return np.unique(acc)


def signature(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        values = ((shingles[:, None] ^ b[None, :]) * a[None, :]) >> np.uint64(32)
    return values.min(axis=0).astype(np.uint32)


def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted area of false positives below the threshold and
    false negatives above it, for the S-curve 1 - (1 - s^rows)^bands."""
    below, above = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)
    best, best_cost = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - below**rows) ** bands, below)
            fn = np.trapezoid((1 - above**rows) ** bands, above)
            cost = (1 - fn_weight) * fp + fn_weight * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller index roots the cluster: it is the document kept
            self.parent[max(rx, ry)] = min(rx, ry)


def fuzzy_clusters(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Per document, the index of its cluster's first document (itself when unique)."""
    n, num_perm = signatures.shape
    bands, rows = lsh_params(threshold, num_perm)
    uf = UnionFind(n)
    for band in range(bands):
        keys = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows]).view(
            np.dtype((np.void, rows * 4))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse] > 1)
        if not len(shared):
            continue
        order = shared[np.argsort(inverse[shared], kind="stable")]
        groups = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
        for group in groups:
            head = group[0]
            agree = (signatures[group[1:]] == signatures[head]).mean(axis=1)
            for other in group[1:][agree >= threshold]:
                uf.union(int(head), int(other))
    return np.array([uf.find(i) for i in range(n)])
