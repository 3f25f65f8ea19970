"""Sampling from the Megatron model with megatron-core's static KV cache.

Every TP rank runs the same forward (logits gathered over TP) and draws with the same seeded
CPU generator, so all TP ranks produce identical tokens without a broadcast, and the result
does not depend on the TP size. Under PP each forward walks the stages in order: a stage
receives the previous stage's hidden states, runs its layers (each stage keeps the KV cache of
its own layers) and sends its output on; the last stage samples, and the new tokens are
broadcast to every stage of the pipeline for the next step. megatron-core's own inference
engines do this with CUDA-only machinery, so kiln does it with plain send/recv here.

Used by RLHF rollouts (`generate`) and by `kiln serve` (`stream`, `token_logprobs`).
"""

from __future__ import annotations

from collections.abc import Iterator

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


def generate(model, prompt: list[int], count: int, gen: GenerationConfig, stop: set[int], vocab_size: int,
             seed: int) -> list[list[int]]:
    """`count` completions of one prompt (stop token included when reached)."""
    out: list[list[int]] = [[] for _ in range(count)]
    for nxt in stream(model, prompt, count, gen, stop, vocab_size, seed):
        for row in range(count):
            if not out[row] or out[row][-1] not in stop:
                out[row].append(int(nxt[row]))
    return out


@torch.no_grad()
def stream(model, prompt: list[int], count: int, gen: GenerationConfig, stop: set[int], vocab_size: int,
           seed: int) -> Iterator[torch.Tensor]:
    """Each step's next tokens [count], on every rank, until every row has drawn a stop token (a
    finished row keeps drawing; its later tokens mean nothing) or after gen.max_new_tokens. A
    consumer may stop early (stop strings): every rank must then stop at the same step."""
    from megatron.core.inference.contexts import StaticInferenceContext

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt] * count, device=device)
    context = StaticInferenceContext(count, len(prompt) + gen.max_new_tokens)

    stages = Stages(model)

    def last_logits(inputs: torch.Tensor, start: int) -> torch.Tensor | None:
        """The last position's logits on the last stage (None on the others)."""
        out = stages.forward(inputs, start, context)
        context.sequence_len_offset += inputs.size(1)
        return None if out is None else out[:, -1, :vocab_size]  # the padded vocabulary rows are never sampled

    was_training = model.training
    model.eval()
    try:
        logits = last_logits(tokens, 0)
        done = torch.zeros(count, dtype=torch.bool)
        for i in range(gen.max_new_tokens):
            drawn = sample(logits, gen, generator) if stages.last else torch.zeros(count, dtype=torch.long)
            nxt = stages.share(drawn)
            yield nxt
            done |= torch.tensor([int(t) in stop for t in nxt])
            if done.all() or i + 1 == gen.max_new_tokens:
                break
            logits = last_logits(nxt[:, None].to(device), len(prompt) + i)
    finally:
        model.train(was_training)


@torch.no_grad()
def token_logprobs(model, rows: list[list[int]], vocab_size: int, top: int) -> list[tuple]:
    """For each row of tokens: the log-probabilities of row[1:] given what precedes each, and the
    `top` most likely tokens at those positions ((chosen [n-1], values [n-1, top], ids [n-1, top])),
    on every rank: one forward over the batch, without a KV cache. Shorter rows are padded at the
    end, which changes nothing before the padding: every position attends only to earlier ones."""
    stages = Stages(model)
    width, k = max(map(len, rows)), max(top, 1)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row)
    was_training = model.training
    model.eval()
    try:
        logits = stages.forward(batch.to(stages.device), 0, None)
    finally:
        model.train(was_training)
    chosen, values = torch.zeros(len(rows), width - 1), torch.zeros(len(rows), width - 1, k)
    ids = torch.zeros(len(rows), width - 1, k, dtype=torch.long)
    if stages.last:
        for i, row in enumerate(rows):
            n = len(row) - 1
            chosen[i, :n], values[i, :n], ids[i, :n] = scored(logits[i, :n, :vocab_size], row[1:], k)
    # the other stages receive the last stage's figures
    chosen, values, ids = stages.share(chosen), stages.share(values), stages.share(ids)
    return [(chosen[i, :len(row) - 1], values[i, :len(row) - 1], ids[i, :len(row) - 1])
            for i, row in enumerate(rows)]


def scored(logits: torch.Tensor, targets: list[int], top: int):
    """From next-token logits [n, V]: each target's log-probability [n], and the `top` best
    log-probabilities [n, top] with their token ids."""
    logps = logits.float().cpu().log_softmax(-1)
    best = logps.topk(top, dim=-1)
    return logps.gather(1, torch.tensor(targets)[:, None])[:, 0], best.values, best.indices


class Stages:
    """This rank's place in the pipeline, for stage-by-stage generation."""

    def __init__(self, model):
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_attr_wrapped_model

        self.ps, self.model = ps, model
        self.size = ps.get_pipeline_model_parallel_world_size()
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.set_input = get_attr_wrapped_model(model, "set_input_tensor")
        self.config = get_attr_wrapped_model(model, "config")
        self.device = next(model.parameters()).device

    def forward(self, inputs: torch.Tensor, start: int, context) -> torch.Tensor | None:
        """This stage's part of one forward of `inputs` [rows, tokens] at positions from `start`:
        the logits (gathered over TP) on the last stage, None on the others."""
        rows, count = inputs.shape
        positions = torch.arange(start, start + count, device=self.device).expand(rows, -1)
        self.receive(count, rows)
        out = self.model(inputs, positions, None, inference_context=context, runtime_gather_output=True)
        if not self.last:
            self.send(out)
            return None
        return out

    def receive(self, tokens: int, rows: int) -> None:
        if self.first:
            return
        hidden = torch.empty(tokens, rows, self.config.hidden_size, dtype=self.config.params_dtype,
                             device=self.device)
        torch.distributed.recv(hidden, src=self.ps.get_pipeline_model_parallel_prev_rank())
        self.set_input(hidden)

    def send(self, hidden: torch.Tensor) -> None:
        torch.distributed.send(hidden.contiguous(), dst=self.ps.get_pipeline_model_parallel_next_rank())

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last stage's tensor (sampled tokens, log-probabilities), on every stage."""
        if self.size == 1:
            return tokens
        out = tokens.to(self.device)
        torch.distributed.broadcast(out, src=self.ps.get_pipeline_model_parallel_last_rank(),
                                    group=self.ps.get_pipeline_model_parallel_group())
        return out.cpu()
