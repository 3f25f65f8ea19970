"""A generated corpus with planted problems, for tests and benchmarks (self-written word lists,
no third-party text).

Clean documents are a few hundred English words in sentences and paragraphs. Planted: exact
copies (with whitespace and zero-width noise that normalization removes), near-duplicates (a
few words substituted; the Jaccard similarity of their 5-gram sets, about 0.9, is recorded),
junk (symbol spam, too short, repeated lines, bullet lists, ellipsis lines) and non-English
documents (Spanish, German). `generate` returns which is which.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ENGLISH = """the of and to in is was for on that with as by at from his her they we you it this which
be have had were are not but all when there can been one would will more their what so if about
out into up time only other new some could these two may first then any like now such our over
people years because very through just where most after made many before being must well back
year much great good little world own old long make work still way even life day between both
under never three same another while last might us part found place thing house small know
water family city country river road village market harbour mill farm garden field morning
evening night winter summer spring autumn weather rain wind light fire bread stone wood glass
clay iron rope boat bridge window door table chair letter story music song teacher student
doctor baker potter weaver builder painter farmer sailor friend neighbour brother sister
mother father child children carried built painted opened closed walked talked waited worked
listened remembered decided learned wanted needed found brought bought sold mended watched
quiet bright warm cold careful patient curious gentle busy early late ready simple""".split()
SPANISH = """el la de que y en los se del las por un para con una su al es lo como pero sus le ya
fue este ha porque esta son entre cuando muy sin sobre también me hasta hay donde quien desde
todo nos durante todos uno les ni contra otros ese eso ante ellos esto antes algunos unos yo otro
otras otra tanto esa estos mucho quienes nada muchos cual poco ella estar estas algunas algo
nosotros casa ciudad agua tiempo mañana noche trabajo camino pueblo mercado panadero pintor""".split()
GERMAN = """der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es
an werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war
haben nur oder aber vor zur bis mehr durch man sein wurde sei wenn kann gegen vom schon dann
unter wir soll ich eines Jahr zwei Jahren diese dieser wieder keine seiner Stadt Wasser Haus
Arbeit Markt Brot Morgen Abend Fenster Tür Garten Brücke Dorf""".split()


def vocabulary() -> list[str]:
    return ENGLISH


def _sentence(rng: random.Random, words: list[str]) -> str:
    chosen = rng.choices(words, k=rng.randint(6, 14))
    return chosen[0].capitalize() + " " + " ".join(chosen[1:]) + "."


def document(rng: random.Random, words: list[str] = ENGLISH, sentences: tuple[int, int] = (22, 40)) -> str:
    parts = [_sentence(rng, words) for _ in range(rng.randint(*sentences))]
    return "\n\n".join(" ".join(parts[i:i + 4]) for i in range(0, len(parts), 4))


def junk(rng: random.Random, kind: str) -> str:
    line = _sentence(rng, ENGLISH)
    if kind == "symbols":
        return " ".join(rng.choice(["#", "$$", "@@", "%", "&&", "***"]) + rng.choice(ENGLISH) for _ in range(120))
    if kind == "short":
        return _sentence(rng, ENGLISH)
    if kind == "repeated_lines":
        return "\n".join([line] * 40)
    if kind == "bullets":
        return "\n".join("• " + _sentence(rng, ENGLISH) for _ in range(30))
    if kind == "ellipsis":
        return "\n".join(_sentence(rng, ENGLISH)[:-1] + "..." for _ in range(30))
    raise ValueError(kind)


JUNK = ("symbols", "short", "repeated_lines", "bullets", "ellipsis")


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    def shingles(text):
        w = text.lower().split()
        return {tuple(w[i:i + ngram]) for i in range(len(w) - ngram + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def generate(path: Path, documents: int, exact: float = 0.1, near: float = 0.1, junk_share: float = 0.0,
             foreign: float = 0.0, seed: int = 0) -> dict:
    """Write JSONL {id, text}; return which ids are planted copies, junk or foreign."""
    rng = random.Random(seed)
    originals: list[tuple[str, str]] = []
    truth: dict = {"exact": {}, "near": {}, "junk": {}, "foreign": {}}
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
                tokens = source.split(" ")
                for pos in rng.sample(range(len(tokens)), rng.randint(1, 3)):
                    tokens[pos] = rng.choice(ENGLISH)
                text = " ".join(tokens)
                truth["near"][doc_id] = (source_id, jaccard(source, text))
            elif roll < exact + near + junk_share:
                kind = rng.choice(JUNK)
                text = junk(rng, kind)
                truth["junk"][doc_id] = kind
            elif roll < exact + near + junk_share + foreign:
                lang, words = rng.choice([("es", SPANISH), ("de", GERMAN)])
                text = document(rng, words)
                truth["foreign"][doc_id] = lang
            else:
                text = document(rng)
                originals.append((doc_id, text))
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return truth
