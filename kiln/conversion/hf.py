"""Hugging Face checkpoint directories, read and written one tensor at a time.

Reading memory-maps each safetensors shard (safetensors' own lazy `safe_open`); writing fills
shards up to a size limit and writes `model.safetensors.index.json`, as `save_pretrained` does,
so transformers, vLLM and TensorRT-LLM's LLM API load the result.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from kiln.config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
INDEX = "model.safetensors.index.json"


class HFFormatError(ValueError):
    pass


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise HFFormatError(f"{directory}: no config.json; a Hugging Face model directory needs one")
    return json.loads(path.read_text())


class Reader:
    """Tensors of an HF directory by name, without loading the model."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in self.directory.glob("*.safetensors")]
            if not files:
                raise HFFormatError(f"{directory}: no *.safetensors files (kiln does not read pickled .bin weights)")
            weight_map = None
        self._files = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise HFFormatError(f"{path} is named by {INDEX} but missing")
            _check_safetensors(path)
            handle = safe_open(str(path), framework="pt")
            self._files[name] = handle
            for key in handle.keys():
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
        return self._files[self._where[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())


def _check_safetensors(path: Path) -> None:
    """A truncated download has a header promising more bytes than the file holds."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFFormatError(f"{path} is truncated ({size} bytes): download it again")
        header_len = struct.unpack("<Q", head)[0]
        if 8 + header_len > size:
            raise HFFormatError(f"{path} is truncated: its header needs {8 + header_len} bytes; download it again")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise HFFormatError(
            f"{path} is truncated: {size} bytes, its tensors need {8 + header_len + end}; download it again"
        )


class Writer:
    """Sharded safetensors output: add tensors in any order, then `finish`."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 1024**3):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._shards)
        save_file(self._pending, str(self.directory / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            (self.directory / f"part-{i:05d}.safetensors").rename(self.directory / final)
            weight_map.update({name: final for name in names})
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
