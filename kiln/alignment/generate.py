"""Sampling from the Megatron model with megatron-core's static KV cache.

Every TP rank runs the same forward (logits gathered over TP) and draws with the same seeded
CPU generator, so all TP ranks produce identical tokens without a broadcast, and the result
does not depend on the TP size. Pipeline-parallel generation is not implemented: validation
refuses RLHF with parallel.pp > 1.
"""

from __future__ import annotations

import torch

from kiln.config import GenerationConfig


def sample(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from [b, V] logits: greedy at temperature 0, else top-k / top-p."""
    logits = logits.float().cpu()
    if gen.temperature == 0:
        return logits.argmax(-1)
    logits = logits / gen.temperature
    if gen.top_k:
        kth = logits.topk(gen.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > gen.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: list[int], count: int, gen: GenerationConfig, stop: set[int], vocab_size: int,
             seed: int) -> list[list[int]]:
    """`count` completions of one prompt (stop token included when reached)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt] * count, device=device)
    context = StaticInferenceContext(count, len(prompt) + gen.max_new_tokens)

    def last_logits(inputs: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + inputs.size(1), device=device).expand(count, -1)
        logits = model(inputs, positions, None, inference_context=context, runtime_gather_output=True)
        context.sequence_len_offset += inputs.size(1)
        return logits[:, -1, :vocab_size]  # the padded vocabulary rows are never sampled

    was_training = model.training
    model.eval()
    try:
        logits = last_logits(tokens, 0)
        out: list[list[int]] = [[] for _ in range(count)]
        done = torch.zeros(count, dtype=torch.bool)
        for i in range(gen.max_new_tokens):
            nxt = sample(logits, gen, generator)
            for row in range(count):
                if not done[row]:
                    out[row].append(int(nxt[row]))
            done |= torch.tensor([int(t) in stop for t in nxt])
            if done.all() or i + 1 == gen.max_new_tokens:
                break
            logits = last_logits(nxt[:, None].to(device), len(prompt) + i)
    finally:
        model.train(was_training)
    return out
