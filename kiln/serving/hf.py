"""The transformers backend: an HF directory (what `kiln convert --to hf` writes) in one process.

Tokens are drawn one step at a time over transformers' KV cache with kiln's own sampler
(kiln.training.generate.sample), so greedy output equals transformers' `generate`, and a seeded
sample equals the Megatron backend's for the same logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import torch

from kiln.config import GenerationConfig, ServeConfig
from kiln.data import tokenizer as tokenizers
from kiln.training.generate import sample, scored

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFBackend:
    def __init__(self, cfg: ServeConfig):
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = tokenizers.load(cfg.tokenizer or cfg.source)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(Path(cfg.source)), dtype=DTYPES[cfg.dtype] if cfg.dtype else "auto", local_files_only=True
        ).to(self.device).eval()
        config = self.model.config
        self.positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab_size = config.vocab_size
        # transformers 5 renamed past_key_values to cache (the old name still works, with a warning)
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.stop_ids = {*eos, tokenizers.eod_id(self.tokenizer)}

    @torch.no_grad()
    def stream(self, prompt: list[int], gen: GenerationConfig, seed: int) -> Iterator[int]:
        generator = torch.Generator().manual_seed(seed)
        inputs, cache = torch.tensor([prompt], device=self.device), None
        for _ in range(gen.max_new_tokens):
            out = self.model(input_ids=inputs, use_cache=True, **{self.cache_name: cache})
            cache = out[self.cache_name]
            token = int(sample(out.logits[:, -1], gen, generator)[0])
            yield token
            if token in self.stop_ids:
                return
            inputs = torch.tensor([[token]], device=self.device)

    @torch.no_grad()
    def logprobs(self, tokens: list[int], top: int):
        logits = self.model(input_ids=torch.tensor([tokens], device=self.device)).logits[0, :-1]
        return scored(logits, tokens[1:], max(top, 1))

    def close(self) -> None:
        """Nothing to release: the model lives in this process alone."""
