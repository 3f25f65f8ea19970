"""A rule-based reward for the RLHF tests: dense enough that 12 sampled tokens carry a signal."""


def letter_a(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of the completion's characters that are the letter 'a'."""
    return [c.count("a") / max(len(c), 1) for c in completions]
