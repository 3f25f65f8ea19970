"""Hugging Face checkpoint directories, read and written one tensor at a time.

Tensors stream through kiln.conversion.safetensors_io: one tensor in memory at a time, however
large the model. Output shards and `model.safetensors.index.json` are laid out as
`save_pretrained` does, so transformers, vLLM and TensorRT-LLM's LLM API load the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kiln.conversion.safetensors_io import Entry, SafetensorsError, StreamReader, StreamWriter
from kiln.errors import ConfigError, HFFormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
INDEX = "model.safetensors.index.json"


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise HFFormatError(f"{directory}: no config.json; a Hugging Face model directory needs one")
    return json.loads(path.read_text())


class Reader:
    """Tensors of an HF directory by name, read one at a time without loading the model."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise HFFormatError(f"{directory}: no *.safetensors files (kiln does not read pickled .bin weights)")
            weight_map = None
        self._files: dict[str, StreamReader] = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise HFFormatError(f"{path} is named by {INDEX} but missing")
            try:
                self._files[name] = StreamReader(path)
            except SafetensorsError as exc:
                raise HFFormatError(str(exc)) from None
            for key in self._files[name].keys():
                self._where[key] = name
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._where))
            if absent:
                raise HFFormatError(f"{index} names tensors no shard holds: {', '.join(absent[:5])}")

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise HFFormatError(f"{self.directory}: tensor {name} is missing (the weights do not match config.json)")
        return self._files[self._where[name]].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._files[self._where[name]].dtype(name)


class Writer:
    """Sharded safetensors output streamed in a planned order: shards fill up to a size limit
    and `model.safetensors.index.json` maps names to shards, as `save_pretrained` writes them."""

    def __init__(self, directory: str | Path, entries: list[Entry], max_shard_bytes: int = 5 * 1024**3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[list[Entry]] = [[]]
        size = 0
        for e in entries:
            if self.shards[-1] and size + e.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(e)
            size += e.nbytes
        self.total_bytes = sum(e.nbytes for e in entries)
        self._names = [self._name(i) for i in range(len(self.shards))]
        self._index, self._writer, self._left = -1, None, 0

    def _name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._index += 1
            self._writer = StreamWriter(self.directory / self._names[self._index], self.shards[self._index])
            self._left = len(self.shards[self._index])
        self._writer.write(name, tensor)
        self._left -= 1

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
        weight_map = {e.name: self._names[i] for i, shard in enumerate(self.shards) for e in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_config(directory: Path, config: dict, dtype: torch.dtype) -> None:
    config = {**config, "torch_dtype": str(dtype).replace("torch.", "")}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"do_sample": False, "transformers_version": _transformers_version()}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generation[key] = config[key]
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def copy_tokenizer(source: str | Path | None, target: Path) -> list[str]:
    if not source or not Path(source).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, target / name)
            copied.append(name)
    return copied


def special_token_ids(tokenizer_dir: str | Path | None) -> dict:
    """bos/eos ids for config.json and generation_config.json, from the tokenizer's own files."""
    if not tokenizer_dir or not (Path(tokenizer_dir) / "tokenizer.json").exists():
        return {}
    from kiln.data.tokenizer import load

    tok = load(tokenizer_dir)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
