"""Writes the post-training demo sets from the same small world as corpus.jsonl (no
third-party text); the seed makes them byte-identical:

- sft.jsonl / sft_valid.jsonl: chat `messages` (some multi-turn, some with a system turn) and
  `prompt`/`completion` records; lengths spread like instruction data (many short, few long).
- preference.jsonl / preference_valid.jsonl: {prompt, chosen, rejected}; the chosen answer is a
  clean sentence, the rejected one stutters (a learnable preference).
- prompts.jsonl: RLHF prompts.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import NAMES, PLACES, THINGS, TRADES, story  # noqa: E402

QUESTIONS = ["What does {a} do?", "Tell me about {a}.", "Who is {a}?", "Describe {a} in one sentence."]


def answer(rng: random.Random, a: str) -> str:
    return f"{a} is a {rng.choice(TRADES)} who lives near {rng.choice(PLACES)}."


def stutter(rng: random.Random, text: str) -> str:
    words = text.split()
    i = rng.randrange(len(words))
    return " ".join(words[:i] + [words[i]] * rng.randint(3, 6) + words[i + 1:])


def sft_record(rng: random.Random) -> dict:
    a = rng.choice(NAMES)
    kind = rng.random()
    if kind < 0.15:  # the long tail: a story on request
        return {"messages": [{"role": "user", "content": f"Write a short story about {a}."},
                             {"role": "assistant", "content": story(rng)}]}
    if kind < 0.35:
        b = rng.choice(NAMES)
        return {"messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": rng.choice(QUESTIONS).format(a=a)},
            {"role": "assistant", "content": answer(rng, a)},
            {"role": "user", "content": f"And what did {a} give {b}?"},
            {"role": "assistant", "content": f"{a} gave {b} {rng.choice(THINGS)}."}]}
    if kind < 0.5:
        return {"prompt": f"Question: {rng.choice(QUESTIONS).format(a=a)}\nAnswer: ", "completion": answer(rng, a)}
    return {"messages": [{"role": "user", "content": rng.choice(QUESTIONS).format(a=a)},
                         {"role": "assistant", "content": answer(rng, a)}]}


def preference_record(rng: random.Random) -> dict:
    a = rng.choice(NAMES)
    good = answer(rng, a)
    return {"prompt": rng.choice(QUESTIONS).format(a=a), "chosen": good, "rejected": stutter(rng, good)}


def write(name: str, records) -> None:
    with open(Path(__file__).with_name(name), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(seed: int = 11) -> None:
    rng = random.Random(seed)
    write("sft.jsonl", [sft_record(rng) for _ in range(400)])
    write("sft_valid.jsonl", [sft_record(rng) for _ in range(40)])
    write("preference.jsonl", [preference_record(rng) for _ in range(400)])
    write("preference_valid.jsonl", [preference_record(rng) for _ in range(64)])
    write("prompts.jsonl", [{"prompt": rng.choice(QUESTIONS).format(a=rng.choice(NAMES))} for _ in range(64)])


if __name__ == "__main__":
    main()
