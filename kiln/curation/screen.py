"""The per-document work of `kiln curate`, the same in a local worker process and a Ray task:
normalize, judge with the filters, digest, MinHash, redact."""

from __future__ import annotations

import hashlib
from collections import Counter

from kiln.config import CurateConfig
from kiln.curation import dedup

_SCREENER = None  # per process: the filters, with the language-id model loaded once


def process_texts(texts: list[str], cfg: CurateConfig) -> list[tuple]:
    """Per document: the text to write, the digest of its normalized content, its MinHash
    signature, the PII it redacted, the filter that rejected it (or None) and its language."""
    from kiln.curation.normalize import normalize
    from kiln.curation.pii import redact

    global _SCREENER
    screen = cfg.filters.enabled and cfg.filters.engine == "kiln"
    if screen and _SCREENER is None:
        from kiln.curation.filters import Screener

        _SCREENER = Screener(cfg.filters)
        _SCREENER.load_models()
    a, b = dedup.permutations(cfg.num_perm)
    out = []
    for text in texts:
        clean = normalize(text) if cfg.normalize else text
        rejected, language = _SCREENER(clean) if screen else (None, None)
        digest = hashlib.blake2b(clean.encode(), digest_size=16).digest()
        sig = dedup.signature(dedup.shingle_hashes(clean, cfg.ngram), a, b) if cfg.fuzzy_dedup else None
        counts: Counter = Counter()
        written = redact(clean, counts) if cfg.pii and rejected is None else clean
        out.append((written, digest, sig, counts, rejected, language))
    return out
