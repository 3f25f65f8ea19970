"""The megatron-core backend: a kiln checkpoint on kiln's own engine, TP x PP ranks together.

Every rank builds its shard of the model, loads the checkpoint (resharded to this layout) and
runs each job with kiln.training.generate: KV-cached generation and prompt scoring that give the
same tokens whatever the TP/PP layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kiln.config import GenerationConfig, ServeConfig
from kiln.data import tokenizer as tokenizers
from kiln.training import generate, inference

# followers wait in a broadcast for the next request, however long the server idles; a rank that
# dies still ends the others (torchrun stops the whole group)
IDLE_TIMEOUT_MINUTES = 60 * 24 * 365


class MegatronBackend:
    def __init__(self, cfg: ServeConfig):
        loaded = inference.open_model(cfg.source, cfg.parallel, cfg.dtype, IDLE_TIMEOUT_MINUTES)
        self.tokenizer = tokenizers.load(cfg.tokenizer or loaded.tokenizer)
        self.positions, self.vocab_size = loaded.model.max_position_embeddings, loaded.model.vocab_size
        self.stop_ids = {tokenizers.eod_id(self.tokenizer)}
        self.model = loaded.first

    def stream(self, prompt: list[int], gen: GenerationConfig, seed: int) -> Iterator[int]:
        steps = generate.stream(self.model, prompt, 1, gen, self.stop_ids, self.vocab_size, seed)
        with contextlib.closing(steps):
            for nxt in steps:
                yield int(nxt[0])

    def logprobs(self, tokens: list[int], top: int):
        return generate.token_logprobs(self.model, [tokens], self.vocab_size, max(top, 1))[0]

    def close(self) -> None:
        inference.close()
