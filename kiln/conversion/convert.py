"""`kiln convert`: HF <-> Megatron <-> .nemo, tensor by tensor, verified by logits.

Every direction goes through one view: megatron-core's global tensors, read from any source by
(key, layer). Writers pull one layer of one tensor at a time, so memory stays at a layer's worth
whatever the model size. Output lands in `<output>.tmp-<id>` and is renamed only after the
parity check passes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln import overrides
from kiln.artifact import atomic_dir, write_manifest
from kiln.config import ConfigError, ConvertConfig, ModelConfig
from kiln.conversion import dcp, families, hf, megatron, nemo
from kiln.conversion.mapping import Param
from kiln.conversion.safetensors_io import Entry
from kiln.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens

FORMATS = ("hf", "megatron", "nemo2", "nemo")
VERIFY_DEFAULT_MAX_PARAMS = 2_000_000_000  # above this, --verify must be asked for (it loads both models)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    """A source seen as megatron-core global tensors."""

    config: ModelConfig
    model_type: str  # HF model_type it came from or exports as
    params: list[Param]
    read: object  # (key, layer) -> tensor
    shape: object  # key -> global shape
    dtype: torch.dtype
    tokenizer: str | None
    describe: str


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".nemo":
        return "nemo"
    if (path / "config.json").exists():
        return "hf"
    if (path / "context").is_dir() and (path / "weights").is_dir():
        return "nemo2"
    if (path / "metadata.json").exists() or (path / "latest").exists() or (path / "checkpoints").is_dir():
        return "megatron"
    raise ConfigError(f"{path}: not a Hugging Face directory (config.json), a kiln Megatron checkpoint "
                      f"(metadata.json or checkpoints/latest), a NeMo 2 directory (context/, weights/) or a .nemo file")


def open_hf(directory: Path, tp: int) -> Model:
    cfg = hf.read_config(directory)
    family = families.for_model_type(cfg.get("model_type"), f"{directory}/config.json")
    m = family.model_config(cfg)
    padded = m.padded_vocab_size(tp)
    params = family.params(m, padded)
    reader = hf.Reader(directory)
    _check_hf_names(reader, params, m, directory, cfg)
    by_key = {p.megatron: p for p in params}

    def read(key, layer=None):
        p = by_key[key]
        return p.transform.to_megatron([reader.get(n) for n in p.hf_names(layer)])

    shapes = _megatron_shapes(params, m, padded, lambda name: reader.shape(name), directory)
    dtype = reader.dtype(params[0].hf_names(0)[0])
    return Model(m, cfg["model_type"], params, read, shapes.__getitem__, dtype, str(directory), f"HF {directory}")


def _check_hf_names(reader: hf.Reader, params: list[Param], m: ModelConfig, directory: Path, cfg: dict) -> None:
    expected = {name for p in params for layer in range(m.num_layers) for name in p.hf_names(layer)}
    present = reader.names()
    missing = sorted(expected - present)
    ignorable = {"lm_head.weight"} if m.tie_embeddings else set()
    unexpected = sorted(n for n in present - expected - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise hf.HFFormatError(
            f"{directory}: the weights do not match config.json ({cfg.get('num_hidden_layers', cfg.get('n_layer'))} "
            f"layers, model_type {cfg.get('model_type')}): missing {missing[:4] or 'none'}, unexpected "
            f"{unexpected[:4] or 'none'}; fix config.json or point at the matching weights"
        )


def _megatron_shapes(params, m: ModelConfig, padded: int, hf_shape, source) -> dict:
    """Each megatron key's global shape, checked by running the transforms on meta tensors."""
    shapes = {}
    for p in params:
        names = p.hf_names(0)
        try:
            out = p.transform.to_megatron([torch.empty(hf_shape(n), device="meta") for n in names])
        except (RuntimeError, ValueError) as exc:
            raise hf.HFFormatError(f"{source}: {', '.join(names)} have shapes "
                                   f"{[hf_shape(n) for n in names]} that do not fit config.json ({exc})") from None
        shape = tuple(out.shape)
        if p.per_layer:
            for layer in range(1, m.num_layers):
                for n0, n in zip(names, p.hf_names(layer), strict=True):
                    if hf_shape(n) != hf_shape(n0):
                        raise hf.HFFormatError(f"{source}: {n} has shape {hf_shape(n)}, layer 0 has {hf_shape(n0)}")
            shape = (m.num_layers,) + shape
        shapes[p.megatron] = shape
    expected = _expected_shapes(m, padded)
    for key, shape in shapes.items():
        if key in expected and shape != expected[key]:
            raise hf.HFFormatError(f"{source}: {key} would be {shape}, but config.json implies {expected[key]}; "
                                   f"the weights do not match config.json")
    return shapes


def _expected_shapes(m: ModelConfig, padded: int) -> dict:
    h, d, L = m.hidden_size, m.head_dim, m.num_layers
    qkv = (m.num_attention_heads + 2 * m.heads_kv) * d
    fc1 = m.ffn_size * (2 if m.activation == "swiglu" else 1)
    return {
        "embedding.word_embeddings.weight": (padded, h), "output_layer.weight": (padded, h),
        "decoder.layers.self_attention.linear_qkv.weight": (L, qkv, h),
        "decoder.layers.self_attention.linear_proj.weight": (L, h, m.num_attention_heads * d),
        "decoder.layers.mlp.linear_fc1.weight": (L, fc1, h), "decoder.layers.mlp.linear_fc2.weight": (L, h, m.ffn_size),
    }


def open_megatron(reader: dcp.Reader, common: dict, prefix: str, describe: str, tokenizer: str | None) -> Model:
    state = common.get("kiln", {})
    if "model" not in state:
        raise megatron.MegatronFormatError(
            f"{describe}: its common.pt records no model config (written by a kiln older than conversion, or by "
            f"another tool); convert from a checkpoint written by `kiln pretrain` or `kiln convert`"
        )
    m = overrides.from_dict(ModelConfig, state["model"])
    model_type = state.get("hf_model_type") or families.model_type_for(m)
    family = families.for_model_type(model_type, describe)
    padded = reader.shape(prefix + "embedding.word_embeddings.weight")[0]
    params = family.params(m, padded)
    expected = {prefix + p.megatron for p in params}
    present = {k for k in reader.tensor_keys() if not k.startswith(prefix + "optimizer.") and
               not k.startswith("optimizer.")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise megatron.MegatronFormatError(f"{describe}: tensors do not match its model config: missing "
                                           f"{missing[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}")

    def read(key, layer=None):
        return reader.read(prefix + key, layer)

    shape = lambda key: reader.shape(prefix + key)  # noqa: E731
    dtype = reader.dtype(prefix + params[0].megatron)
    return Model(m, model_type, params, read, shape, dtype, tokenizer or state.get("tokenizer"), describe)


def open_source(path: Path, tp: int, tokenizer: str | None) -> Model:
    kind = detect_format(path)
    if kind == "hf":
        return open_hf(path, tp)
    if kind == "megatron":
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        reader, common = megatron.open_checkpoint(root)
        return open_megatron(reader, common, "", f"Megatron checkpoint {reader.path}", tokenizer)
    if kind == "nemo2":
        reader, common, tok = nemo.open_nemo2(path)
        return open_megatron(reader, common, nemo.NEMO2_PREFIX, f"NeMo 2 checkpoint {path}", tokenizer or tok)
    reader, common, tok = nemo.open_nemo_archive(path)
    return open_megatron(reader, common, nemo.NEMO1_PREFIX, f".nemo archive {path}", tokenizer or tok)


def megatron_chunks(model: Model, prefix: str, dtype: torch.dtype, progress) -> list[dcp.Chunk]:
    chunks = []
    for p in model.params:
        shape = model.shape(p.megatron)
        key = prefix + p.megatron

        def produce(key=p.megatron, layer=None):
            tensor = model.read(key, layer).to(dtype)
            progress(tensor.numel() * tensor.element_size())
            return tensor.unsqueeze(0) if layer is not None else tensor

        if p.per_layer:
            for layer in range(shape[0]):
                chunks.append(dcp.Chunk(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:], shape, dtype,
                                        lambda layer=layer, produce=produce: produce(layer=layer)))
        else:
            chunks.append(dcp.Chunk(key, (0,) * len(shape), shape, shape, dtype, produce))
    return chunks + megatron.extra_state_chunks(model.config.num_layers, prefix)


def common_state(model: Model, tokenizer: str | None) -> dict:
    return {"kiln": {"step": 0, "model": overrides.to_dict(model.config), "hf_model_type": model.model_type,
                     "tokenizer": tokenizer}}


def hf_entries(model: Model, dtype: torch.dtype) -> list[Entry]:
    """The HF tensors a model becomes, in writing order, from shapes alone (meta tensors)."""
    entries = []
    for p in model.params:
        shape = model.shape(p.megatron)
        layers = range(shape[0]) if p.per_layer else [None]
        for layer in layers:
            meta = torch.empty(shape[1:] if p.per_layer else shape, device="meta")
            for name, t in zip(p.hf_names(layer), p.transform.to_hf(meta), strict=True):
                entries.append(Entry(name, tuple(t.shape), dtype))
    return entries


def write_hf(model: Model, out: Path, dtype: torch.dtype, max_shard_bytes: int, progress) -> None:
    writer = hf.Writer(out, hf_entries(model, dtype), max_shard_bytes)
    for p in model.params:
        layers = range(model.config.num_layers) if p.per_layer else [None]
        for layer in layers:
            tensors = p.transform.to_hf(model.read(p.megatron, layer))
            for name, tensor in zip(p.hf_names(layer), tensors, strict=True):
                tensor = tensor.to(dtype)
                writer.add(name, tensor)
                progress(tensor.numel() * tensor.element_size())
    writer.finish()
    family = families.for_model_type(model.model_type, model.describe)
    config = {**family.hf_config(model.config, model.model_type), **hf.special_token_ids(model.tokenizer)}
    hf.write_config(out, config, dtype)
    hf.copy_tokenizer(model.tokenizer, out)


def total_bytes(model: Model, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(int(torch.Size(model.shape(p.megatron)).numel()) * size for p in model.params)


def convert(cfg: ConvertConfig) -> dict:
    started = time.time()
    if cfg.to not in FORMATS:
        raise ConfigError(f"--to {cfg.to}: choose one of {', '.join(FORMATS)}")
    source = Path(cfg.source)
    if not source.exists():
        raise ConfigError(f"{source} does not exist")
    model = open_source(source, cfg.tp, cfg.tokenizer)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else model.dtype
    n_params = sum(int(torch.Size(model.shape(p.megatron)).numel()) for p in model.params)
    verify = cfg.verify if cfg.verify is not None else n_params < VERIFY_DEFAULT_MAX_PARAMS
    out = Path(cfg.output)
    if cfg.to == "nemo" and out.suffix != ".nemo":
        raise ConfigError(f"--output {out}: a .nemo archive's name ends in .nemo")
    tokenizer = model.tokenizer
    staging = out.with_name(out.name + ".staging") if cfg.to == "nemo" else out
    with _progress(total_bytes(model, dtype), f"{model.describe} -> {cfg.to}") as advance, \
            atomic_dir(staging) as tmp:
        if cfg.to == "hf":
            write_hf(model, tmp, dtype, int(cfg.max_shard_gb * 1024**3), advance)
        elif cfg.to == "megatron":
            copied = hf.copy_tokenizer(tokenizer, _mkdir(tmp / "tokenizer"))
            tok = str(out / "tokenizer") if copied else tokenizer
            ckpt_dir = tmp / "checkpoints"
            megatron.write(ckpt_dir / "iter_0000000", megatron_chunks(model, "", dtype, advance),
                           common_state(model, tok))
            (ckpt_dir / "latest").write_text("iter_0000000\n")
        elif cfg.to == "nemo2":
            nemo.write_nemo2(tmp, model, megatron_chunks(model, nemo.NEMO2_PREFIX, dtype, advance),
                             common_state(model, None))
        else:
            nemo.write_nemo_archive(tmp, model, megatron_chunks(model, nemo.NEMO1_PREFIX, dtype, advance),
                                    common_state(model, None))
        delta = _verify(model, tmp, cfg.to) if verify else None
        summary = {"source": str(source), "to": cfg.to, "parameters": n_params, "dtype": str(dtype),
                   "max_abs_logit_delta": delta, "verified": verify, "seconds": round(time.time() - started, 2)}
        if cfg.to == "nemo":  # the archive is the artifact; its staging directory goes
            os.replace(tmp / nemo.ARCHIVE_NAME, out)
        else:
            write_manifest(tmp, "convert", dataclasses.asdict(cfg), [cfg.source], summary, started)
    if cfg.to == "nemo":
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verify(source: Model, out: Path, to: str) -> float:
    """Logits of the source and of what was written, on the same tokens."""
    tokens = sample_tokens(source.config.vocab_size)
    if source.describe.startswith("HF "):
        reference = hf_logits(source.tokenizer, tokens)
    else:
        reference = megatron_logits(source.read, source.config, tokens)
    if to == "hf":
        candidate = hf_logits(out, tokens)
    else:
        written = open_source(_written_path(out, to), 1, None)
        candidate = megatron_logits(written.read, written.config, tokens)
    return compare(reference, candidate, f"{source.describe} vs its {to} conversion")


def _written_path(out: Path, to: str) -> Path:
    return {"megatron": out, "nemo2": out, "nemo": out / nemo.ARCHIVE_NAME}[to]


class _progress:
    """A rich progress bar over bytes written, with throughput; silent when not a terminal."""

    def __init__(self, total: int, description: str):
        self.total, self.description = total, description

    def __enter__(self):
        import sys

        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), disable=not sys.stderr.isatty())
        self._progress.start()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        self._progress.stop()
        return False
