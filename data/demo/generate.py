"""Writes corpus.jsonl: self-written, procedurally varied short stories (no third-party text).

Run `python data/demo/generate.py` to regenerate; the seed makes it byte-identical.
The grammar is small on purpose: a tiny model learns it within a few hundred
steps, so the demo shows a clearly falling loss on two CPU cores.
"""

import json
import random
from pathlib import Path

NAMES = ["Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun",
         "Kemal", "Lina", "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tova"]
TRADES = ["potter", "baker", "miller", "weaver", "smith", "fisher", "carpenter", "gardener",
          "glassblower", "brewer", "mason", "tailor"]
PLACES = ["the harbour", "the old mill", "the market square", "the river bank", "the hill farm",
          "the kiln yard", "the north road", "the orchard", "the quarry", "the lighthouse"]
THINGS = ["a blue jar", "a loaf of rye bread", "a coil of rope", "a bundle of wool",
          "an iron hinge", "a basket of plums", "a clay bowl", "a copper kettle", "a wooden spoon",
          "a lantern", "a sack of flour", "a glass bead"]
WEATHER = ["The morning was cold and bright.", "Rain fell softly all day.",
           "A warm wind came from the south.", "Fog lay thick over the water.",
           "The sky was clear and the air was still.", "Snow had covered the roofs overnight."]
FEELINGS = ["glad", "tired", "curious", "worried", "proud", "calm", "restless", "hopeful"]
VERBS = ["carried", "mended", "sold", "found", "painted", "traded", "wrapped", "polished"]
ENDINGS = ["By evening the work was done, and the lamps were lit.",
           "They agreed to meet again when the moon was full.",
           "Nobody in the village forgot that day.",
           "The next morning everything began again.",
           "It was, in the end, a good trade for both of them."]


def sentence(rng: random.Random, a: str, b: str) -> str:
    templates = [
        lambda: f"{a} the {rng.choice(TRADES)} walked to {rng.choice(PLACES)}.",
        lambda: f"{a} {rng.choice(VERBS)} {rng.choice(THINGS)} for {b}.",
        lambda: f"{b} felt {rng.choice(FEELINGS)} and said nothing for a while.",
        lambda: f"\"Have you seen {rng.choice(THINGS)}?\" asked {a}.",
        lambda: f"\"Not since we were at {rng.choice(PLACES)},\" said {b}.",
        lambda: f"At {rng.choice(PLACES)}, {a} counted {rng.randint(2, 12)} boats and "
                f"{rng.randint(2, 30)} gulls.",
        lambda: f"{a} and {b} shared {rng.choice(THINGS)} and talked about the {rng.choice(TRADES)}.",
        lambda: f"The fire in the kiln burned for {rng.randint(2, 14)} hours before {a} opened it.",
    ]
    return rng.choice(templates)()


def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    parts = [rng.choice(WEATHER)]
    parts += [sentence(rng, a, b) for _ in range(rng.randint(6, 14))]
    parts.append(rng.choice(ENDINGS))
    return " ".join(parts)


def main(count: int = 500, seed: int = 7) -> None:
    rng = random.Random(seed)
    out = Path(__file__).with_name("corpus.jsonl")
    with open(out, "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"demo-{i:05d}", "text": story(rng)}) + "\n")


if __name__ == "__main__":
    main()
