"""A tiny Llama with a BPE tokenizer trained on the demo corpus, as an HF directory and as the kiln
checkpoint `kiln convert` makes of it: the two sources `kiln serve` reads."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT
from tests.conversion.models import build

VOCAB = 512


def hf_model(directory: Path) -> Path:
    from kiln.data import tokenizer

    texts = [json.loads(line)["text"] for line in (ROOT / "data/demo/corpus.jsonl").read_text().splitlines()]
    tokenizer.train_bpe(texts[:400], VOCAB, directory)
    eos = tokenizer.eod_id(tokenizer.load(directory))
    # few heads and KV heads that TP=2 divides; a larger std gives peaked, tie-free logits
    return build("llama", directory, std=0.3, vocab_size=VOCAB, bos_token_id=eos, eos_token_id=eos,
                 pad_token_id=eos)


def megatron_checkpoint(hf_dir: Path, out: Path) -> Path:
    from kiln.config import ConvertConfig
    from kiln.conversion.convert import convert

    convert(ConvertConfig(source=str(hf_dir), output=str(out), to="megatron", verify=False))
    return out
