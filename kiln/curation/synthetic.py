"""A generated corpus with planted duplicates, for tests and benchmarks (no third-party text).

Documents are a few hundred pseudo-words. Planted: exact copies (with whitespace and
zero-width noise that normalization removes) and near-duplicates (a few words substituted,
Jaccard of 5-gram sets about 0.9 and recorded). `truth` says which is which.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ter", "an", "su", "vor", "el", "din", "ra", "po", "sen", "ul", "ba", "ch", "ix"]


def vocabulary(rng: random.Random, size: int = 6000) -> list[str]:
    return ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size)]


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    def shingles(text):
        w = text.lower().split()
        return {tuple(w[i:i + ngram]) for i in range(len(w) - ngram + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def generate(path: Path, documents: int, exact: float = 0.1, near: float = 0.1, seed: int = 0) -> dict:
    """Write JSONL {id, text}; return {"exact": {id: original}, "near": {id: (original, jaccard)}}."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    originals: list[tuple[str, str]] = []
    truth: dict = {"exact": {}, "near": {}}
    with open(path, "w") as f:
        for i in range(documents):
            doc_id = f"doc{i:07d}"
            roll = rng.random()
            if originals and roll < exact:
                source_id, text = rng.choice(originals)
                text = text.replace(" ", "  ", 3) + "\u200b"
                truth["exact"][doc_id] = source_id
            elif originals and roll < exact + near:
                source_id, source = rng.choice(originals)
                tokens = source.split()
                for pos in rng.sample(range(len(tokens)), rng.randint(1, 3)):
                    tokens[pos] = rng.choice(words)
                text = " ".join(tokens)
                truth["near"][doc_id] = (source_id, jaccard(source, text))
            else:
                text = " ".join(rng.choices(words, k=rng.randint(200, 400)))
                originals.append((doc_id, text))
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return truth
