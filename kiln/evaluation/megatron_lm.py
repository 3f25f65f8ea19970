"""A kiln Megatron checkpoint as an lm-evaluation-harness model, scored on kiln's engine.

Every rank runs the same harness over the same requests in the same order (the harness sees
one process: rank 0 of 1), so each forward is a collective all TP/PP ranks enter together;
the last pipeline stage's log-probabilities reach every rank (`generate.token_logprobs`).
Tokenization, the rolling windows of `loglikelihood_rolling` and the metrics are the harness's
own, as for its `hf` model, so a score here and lm-eval's on the HF export of the same
checkpoint differ only by the two forwards: the comparison that catches a bad export.
"""

from __future__ import annotations

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from kiln.config import GenerationConfig
from kiln.training import generate
from kiln.training.inference import Loaded


class MegatronLM(TemplateLM):
    def __init__(self, loaded: Loaded, tokenizer, max_length: int, batch_size: int, seed: int):
        super().__init__()
        self.loaded, self.tokenizer, self._max_length = loaded, tokenizer, max_length
        self.batch_size, self.seed = batch_size, seed

    # as lm-eval's `hf` model: the EOS ends generations, BOS (else EOS) precedes a rolling window
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether every continuation token was the argmax, in
        batches of `batch_size` sequences (the harness's window: at most max_length inputs)."""
        out = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
            scored = generate.token_logprobs(self.loaded.first, rows, self.loaded.model.vocab_size, 1)
            for (_, _, continuation), row, (chosen, _, best) in zip(chunk, rows, scored, strict=True):
                n = len(continuation)
                greedy = bool((best[-n:, 0] == torch.tensor(row[-n:])).all())
                out.append((float(chosen[-n:].double().sum()), greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over the harness's disjoint rolling windows, every
        document's windows scored in one stream of batches."""
        owners, windows = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            for context, target in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                owners.append(index)
                windows.append((None, context, target))
        scores = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            scores[owner] += ll
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            greedy = not kwargs.get("do_sample", False) or kwargs.get("temperature", 0) == 0
            gen = GenerationConfig(max_new_tokens=max_new, temperature=0.0 if greedy else kwargs["temperature"],
                                   top_p=kwargs.get("top_p", 1.0))
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            tokens = generate.generate(self.loaded.first, prompt, 1, gen, {self.eot_token_id},
                                       self.loaded.model.vocab_size, seed=self.seed)[0]
            text = self.tokenizer.decode([t for t in tokens if t != self.eot_token_id])
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out
