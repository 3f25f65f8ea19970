"""Hugging Face tokenizers: load a directory, train a byte-level BPE, adapt one for megatron-core."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

EOD_TOKEN = "<|endoftext|>"
# reserved like a base model's: the built-in chat templates' markers stay single tokens, so a
# model pretrained with this tokenizer can be fine-tuned on chat without resizing its vocab
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]


def load(path: str | os.PathLike):
    """A transformers fast tokenizer from a local directory (never a hub download)."""
    from transformers import AutoTokenizer

    directory = Path(path)
    if not (directory / "tokenizer.json").exists() and not (directory / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"{directory}: no tokenizer.json or tokenizer_config.json; give a tokenizer directory "
            f"(save_pretrained output), or let `kiln prepare` train one with --vocab-size"
        )
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def eod_id(tokenizer) -> int:
    """The end-of-document token appended to every document."""
    for candidate in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOD_TOKEN)):
        if candidate is not None and candidate != tokenizer.unk_token_id:
            return int(candidate)
    raise ValueError(
        "the tokenizer has no eos_token and no <|endoftext|> token: kiln needs one to end documents"
    )


def vocab_size(path: str | os.PathLike) -> int:
    """Number of token ids, read from tokenizer.json without loading transformers."""
    data = json.loads((Path(path) / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def train_bpe(texts: Iterable[str], vocab: int, out_dir: str | os.PathLike) -> None:
    """Train a byte-level BPE on `texts` and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOD_TOKEN, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN, bos_token=EOD_TOKEN)
    fast.save_pretrained(str(out_dir))


class MegatronTokenizer:
    """What megatron-core's GPTDataset reads from a tokenizer: vocab size and the EOD id."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._hf = load(path)
        self.vocab_size = len(self._hf)
        self.eod = eod_id(self._hf)
        self.eos = self.eod

    @property
    def unique_identifiers(self) -> dict:  # megatron-core hashes this into its index cache key
        return {"class": "kiln.MegatronTokenizer", "path": os.path.abspath(self.path)}
