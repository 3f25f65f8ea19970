"""Writes the demo evaluation sets from the same small world as corpus.jsonl (no third-party
text); the seed makes them byte-identical. `kiln eval --suite demo` scores them with lm-eval:

- eval_choice.jsonl: {context, choices, label}: complete a sentence of the world; the right
  ending follows its grammar, the three others are words of the world that never follow there.
  An untrained model is near chance (25 %); the demo pipeline's model is not.
- eval_generate.jsonl: {prompt, answer}: the one word that always ends the sentence, generated
  greedily and compared exactly.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import FEELINGS, NAMES, PLACES, THINGS, TRADES  # noqa: E402

WRONG = ["bread", "kettle", "slowly", "north", "gulls", "plums", "lantern", "harbour", "seven", "rope"]


def sentences(rng: random.Random) -> tuple[str, str]:
    """(start of a sentence, its one grammatical last word or phrase)."""
    a, b = rng.sample(NAMES, 2)
    return rng.choice([
        lambda: (f"{b} felt {rng.choice(FEELINGS)} and said nothing for a", "while"),
        lambda: ("It was, in the end, a good trade for both of", "them"),
        lambda: ("They agreed to meet again when the moon was", "full"),
        lambda: (f"The fire in the kiln burned for {rng.randint(2, 14)} hours before {a} opened", "it"),
        lambda: ("By evening the work was done, and the lamps were", "lit"),
        lambda: (f"At {rng.choice(PLACES)}, {a} counted {rng.randint(2, 12)} boats and {rng.randint(2, 30)}",
                 "gulls"),
        lambda: ("Nobody in the village forgot that", "day"),
        lambda: ("Rain fell softly all", "day"),
    ])()


def choice_item(rng: random.Random) -> dict:
    a, b = rng.sample(NAMES, 2)
    context, right = rng.choice([
        lambda: (f"{a} the {rng.choice(TRADES)} walked to", rng.choice(PLACES) + "."),
        lambda: (f"{a} and {b} shared {rng.choice(THINGS)} and talked about the", rng.choice(TRADES) + "."),
        lambda: (f"{a} felt {rng.choice(FEELINGS)} and said nothing for a", "while."),
        lambda: ("It was, in the end, a good trade for both of", "them."),
        lambda: ("They agreed to meet again when the moon was", "full."),
        lambda: (f"The fire in the kiln burned for {rng.randint(2, 14)} hours before {a} opened", "it."),
    ])()
    wrong = [w + "." for w in rng.sample([w for w in WRONG if w + "." != right], 3)]
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(right)}


def main(seed: int = 11, choice_items: int = 48, generate_items: int = 32) -> None:
    rng = random.Random(seed)
    here = Path(__file__).parent
    with open(here / "eval_choice.jsonl", "w") as f:
        for _ in range(choice_items):
            f.write(json.dumps(choice_item(rng)) + "\n")
    with open(here / "eval_generate.jsonl", "w") as f:
        for _ in range(generate_items):
            prompt, answer = sentences(rng)
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")


if __name__ == "__main__":
    main()
