"""Hugging Face tokenizers: load a directory, train a byte-level BPE, adapt one for megatron-core.

`describe` gives what tokenization needs (the `tokenizers` object, vocabulary size, EOD id)
without importing transformers (~4.5 s of imports here) when the directory's tokenizer.json is
used as is: a generic fast tokenizer (`TokenizersBackend`, `PreTrainedTokenizerFast`) whose named
special tokens are all added tokens of tokenizer.json. Anything else is loaded through
transformers, exactly as `load` does, so the ids never depend on which way was taken.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
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


# transformers classes that load tokenizer.json as it is (others rebuild or amend it on load)
_GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# what save_pretrained writes for a tokenizer; a model directory's weights are not copied
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class Described:
    """What tokenization needs from a tokenizer directory."""

    backend: object  # a tokenizers.Tokenizer, the one transformers' fast tokenizer would use
    vocab_size: int  # len(transformers tokenizer): ids including added tokens
    eod_id: int
    via: str  # "tokenizer.json" (read directly) or "transformers"


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _special_tokens(config: dict) -> tuple[dict, list[str]]:
    """(named special tokens, every special token string) a tokenizer_config.json names."""
    named = {key: _content(config.get(key)) for key in _NAMED if _content(config.get(key)) is not None}
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    decoder = [t for t in (config.get("added_tokens_decoder") or {}).values()]
    return named, [*named.values(), *map(_content, extra), *map(_content, decoder)]


def describe(path: str | os.PathLike) -> Described:
    """The tokenizer behind `load(path)`, its vocabulary size and EOD id; transformers is
    imported only when the directory is not a generic fast tokenizer (see the module doc)."""
    directory = Path(path)
    light = _describe_directly(directory)
    if light is not None:
        return light
    hf = load(directory)
    return Described(hf.backend_tokenizer, len(hf), eod_id(hf), "transformers")


def _describe_directly(directory: Path) -> Described | None:
    from tokenizers import Tokenizer

    files = {name: directory / name for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}
    if not files["tokenizer.json"].is_file() or not files["tokenizer_config.json"].is_file():
        return None
    config = json.loads(files["tokenizer_config.json"].read_text())
    if config.get("tokenizer_class") not in _GENERIC or config.get("auto_map"):
        return None
    named, specials = _special_tokens(config)
    if files["special_tokens_map.json"].is_file():
        more_named, more = _special_tokens(json.loads(files["special_tokens_map.json"].read_text()))
        named, specials = {**more_named, **named}, [*specials, *more]
    backend = Tokenizer.from_file(str(files["tokenizer.json"]))
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    if named.get("eos_token") is None or not set(filter(None, specials)) <= added:
        return None  # transformers would add tokens, or choose the EOD another way
    eod = backend.token_to_id(named["eos_token"])
    unk = backend.token_to_id(named["unk_token"]) if "unk_token" in named else None
    if eod is None or eod == unk:
        return None
    return Described(backend, backend.get_vocab_size(with_added_tokens=True), int(eod), "tokenizer.json")


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the tokenizer of `src` into `dst`: its tokenizer files as they are when `describe`
    reads them directly, else transformers' save_pretrained of `load(src)`."""
    src, dst = Path(src), Path(dst)
    if _describe_directly(src) is None:
        load(src).save_pretrained(str(dst))
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


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
