"""A rule-based reward for the GRPO test: how often the completion says "the"."""


def says_the(prompts: list[str], completions: list[str]) -> list[float]:
    return [c.lower().split().count("the") / max(len(c.split()), 1) for c in completions]
