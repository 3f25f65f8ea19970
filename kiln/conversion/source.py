"""Checkpoint formats as one view: megatron-core's global tensors, read from any source by
(key, layer), and written to any format one layer of one tensor at a time.

`open_source` reads an HF directory, a kiln Megatron checkpoint, a NeMo 2 directory or a
.nemo archive; `megatron_chunks` and `write_hf` produce the other formats from it. The stage
that uses them (`kiln convert`) is kiln.conversion.convert.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln import overrides
from kiln.artifact import CHECKPOINTS, LATEST
from kiln.config import ModelConfig
from kiln.conversion import dcp, families, hf, megatron, nemo
from kiln.conversion.mapping import GateUp, PaddedVocab, Param
from kiln.conversion.safetensors_io import Entry
from kiln.errors import ConfigError
from kiln.training.shapes import global_shapes

_OPTIMIZER = re.compile(r"^(chained_\d+\.)?optimizer\.")
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
    if (path / "metadata.json").exists() or (path / LATEST).exists() or (path / CHECKPOINTS).is_dir():
        return "megatron"
    raise ConfigError(f"{path}: not a Hugging Face directory (config.json), a kiln Megatron checkpoint "
                      f"(metadata.json or checkpoints/latest), a NeMo 2 directory (context/, weights/) or a .nemo file")


def open_hf(directory: Path, tp: int) -> Model:
    cfg = hf.read_config(directory)
    family = families.for_model_type(cfg.get("model_type"), f"{directory}/config.json")
    m = family.model_config(cfg, f"{directory}/config.json")
    padded = m.padded_vocab_size(tp)
    params = family.params(m, padded, cfg["model_type"])
    reader = hf.Reader(directory)
    _check_hf_names(reader, params, m, directory, cfg)
    by_key = {p.megatron: p for p in params}

    def read(key, layer=None, expert=None):
        p = by_key[key]
        return p.transform.to_megatron([reader.get(n) for n in p.hf_names(layer, expert)])

    shapes = _megatron_shapes(params, m, padded, lambda name: reader.shape(name), directory)
    dtype = reader.dtype(params[0].hf_names(0)[0])
    return Model(m, cfg["model_type"], params, read, shapes.__getitem__, dtype, str(directory), f"HF {directory}")


def _check_hf_names(reader: hf.Reader, params: list[Param], m: ModelConfig, directory: Path, cfg: dict) -> None:
    expected = {name for p in params for layer in p.layer_indices(m.num_layers) for expert in p.expert_indices()
                for name in p.hf_names(layer, expert)}
    present = reader.names()
    missing = sorted(expected - present)
    fused = sorted(n for n in present if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    if fused:
        raise hf.HFFormatError(
            f"{directory}: {fused[0]} holds all experts in one tensor (transformers' in-memory layout, saved "
            f"without its conversion back); kiln reads the per-expert tensors save_pretrained writes by default "
            f"and published checkpoints hold: load and save the model again with transformers"
        )
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
        layers, experts = p.layer_indices(m.num_layers), p.expert_indices()
        names = p.hf_names(layers[0] if p.per_layer else None, experts[0])
        try:
            out = p.transform.to_megatron([torch.empty(hf_shape(n), device="meta") for n in names])
        except (RuntimeError, ValueError) as exc:
            raise hf.HFFormatError(f"{source}: {', '.join(names)} have shapes "
                                   f"{[hf_shape(n) for n in names]} that do not fit config.json ({exc})") from None
        shape = tuple(out.shape)
        if p.per_layer:
            for layer in layers:
                for expert in experts:
                    for n0, n in zip(names, p.hf_names(layer, expert), strict=True):
                        if hf_shape(n) != hf_shape(n0):
                            raise hf.HFFormatError(f"{source}: {n} has shape {hf_shape(n)}, {n0} has {hf_shape(n0)}")
            shape = (m.num_layers,) + ((p.experts,) if p.experts else ()) + shape
        shapes[p.megatron] = shape
    expected = global_shapes(m, padded)
    for key, shape in shapes.items():
        if m.moe is not None and key.startswith("decoder.layers.mlp."):
            continue  # the dense shapes do not apply; the expert shapes were checked above, layer by layer
        if key in expected and shape != expected[key]:
            raise hf.HFFormatError(f"{source}: {key} would be {shape}, but config.json implies {expected[key]}; "
                                   f"the weights do not match config.json")
    return shapes


def open_megatron(reader: dcp.Reader, common: dict, prefix: str, describe: str, tokenizer: str | None,
                  config: tuple[ModelConfig, str] | None = None) -> Model:
    """A Megatron-layout checkpoint; its model config is kiln's state in common.pt unless `config`
    (model, HF model_type) is given."""
    if config is None:
        state = common.get("kiln", {})
        if "model" not in state:
            raise megatron.MegatronFormatError(
                f"{describe}: its common.pt records no model config (written by a kiln older than conversion, or "
                f"by another tool); convert from a checkpoint written by `kiln pretrain` or `kiln convert`"
            )
        m = overrides.from_dict(ModelConfig, state["model"])
        config = (m, state.get("hf_model_type") or families.model_type_for(m))
        tokenizer = tokenizer or state.get("tokenizer")
    m, model_type = config
    family = families.for_model_type(model_type, describe)
    padded = reader.shape(prefix + "embedding.word_embeddings.weight")[0]
    params = family.params(m, padded, model_type)
    # training state: `optimizer.…`, or at EP > 1 megatron-core's chained dense and expert optimizers
    present = {k for k in reader.tensor_keys() if not _OPTIMIZER.match(k.removeprefix(prefix))}
    # layers stacked on dim 0, or (an MoE model with dense layers) each layer's tensors named apart
    per_layer = any(megatron.global_key(k.removeprefix(prefix))[1] is not None for k in present)

    def stored(p: Param, layer=None, expert=None) -> tuple[str, tuple[int, ...]]:
        key, index = megatron.stored_at(p.megatron, layer, expert, per_layer)
        return prefix + key, index

    expected = {stored(p, layer)[0] for p in params
                for layer in (p.layer_indices(m.num_layers) if p.per_layer and per_layer else [None])}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise megatron.MegatronFormatError(f"{describe}: tensors do not match its model config: missing "
                                           f"{missing[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}")
    by_key = {p.megatron: p for p in params}

    def read(key, layer=None, expert=None):
        return reader.read(*stored(by_key[key], layer, expert))

    def shape(key):
        p = by_key[key]
        if not (p.per_layer and per_layer):
            return reader.shape(stored(p)[0])
        return (m.num_layers,) + reader.shape(stored(p, p.layer_indices(m.num_layers)[0])[0])

    dtype = reader.dtype(stored(params[0])[0])
    return Model(m, model_type, params, read, shape, dtype, tokenizer, describe)


def open_source(path: Path, tp: int, tokenizer: str | None) -> Model:
    kind = detect_format(path)
    if kind == "hf":
        return open_hf(path, tp)
    if kind == "megatron":
        reader, common = megatron.open_checkpoint(path)
        return open_megatron(reader, common, "", f"Megatron checkpoint {reader.path}", tokenizer)
    if kind == "nemo2":
        reader, config, tok = nemo.open_nemo2(path)
        return open_megatron(reader, {}, nemo.NEMO2_PREFIX, f"NeMo 2 checkpoint {path}", tokenizer or tok, config)
    reader, common, tok = nemo.open_nemo_archive(path)
    return open_megatron(reader, common, nemo.NEMO1_PREFIX, f".nemo archive {path}", tokenizer or tok)


def megatron_chunks(model: Model, prefix: str, dtype: torch.dtype, progress, unpadded: bool = False) -> list[dcp.Chunk]:
    """The checkpoint's chunks as megatron-core saves them: stacked layers one chunk each, SwiGLU's
    linear_fc1 as its gate and up halves. `unpadded`: vocabulary tables cut to the vocabulary
    (NeMo's importer never pads)."""
    chunks = []
    per_layer = megatron.per_layer_keys(model.config)
    if per_layer and prefix:
        raise ConfigError("an MoE model with dense layers (model.moe.layer_pattern) converts to kiln's Megatron "
                          "checkpoints only, not to NeMo formats")
    for p in model.params:
        shape = model.shape(p.megatron)
        rows = model.config.vocab_size if unpadded and isinstance(p.transform, PaddedVocab) else None
        if rows is not None:
            shape = (rows,) + shape[1:]

        last: dict = {}  # the region just read: SwiGLU's two halves are two chunks of one read

        def produce(key=p.megatron, layer=None, expert=None, rows=rows, last=last):
            if layer is not None and last.get("at") == (layer, expert):
                return last["tensor"]
            tensor = model.read(key, layer, expert).to(dtype)
            tensor = tensor[:rows] if rows is not None else tensor
            progress(tensor.numel() * tensor.element_size())
            if layer is None:
                return tensor
            last.update(at=(layer, expert), tensor=tensor)
            return tensor

        if not p.per_layer:
            chunks.append(dcp.Chunk(prefix + p.megatron, (0,) * len(shape), shape, shape, dtype, produce))
            continue
        inner = shape[2:] if p.experts else shape[1:]  # one layer's (one expert's) tensor
        halves = 2 if isinstance(p.transform, GateUp) else 1
        part = inner[0] // halves
        for layer in p.layer_indices(model.config.num_layers):
            for expert in p.expert_indices():
                key, index = megatron.stored_at(p.megatron, layer, expert, per_layer)
                stored_shape = shape[len(shape) - len(inner) - len(index):] if per_layer else shape
                chunk_shape = (1,) * len(index) + (part,) + inner[1:]
                for half in range(halves):
                    offsets = index + (half * part,) + (0,) * (len(inner) - 1)
                    chunks.append(dcp.Chunk(
                        prefix + key, offsets, chunk_shape, stored_shape, dtype,
                        lambda layer=layer, expert=expert, lo=half * part, hi=(half + 1) * part, to=chunk_shape,
                        produce=produce: produce(layer=layer, expert=expert)[lo:hi].reshape(to).contiguous()))
    return chunks + megatron.extra_state_chunks_for(model.config, prefix)


def untied(model: Model) -> Model:
    """The same model with its output layer a copy of its tied embedding."""
    if not model.config.tie_embeddings:
        return model
    config = dataclasses.replace(model.config, tie_embeddings=False)
    family = families.for_model_type(model.model_type, model.describe)
    table = "embedding.word_embeddings.weight"
    source = lambda key: table if key == "output_layer.weight" else key  # noqa: E731
    return dataclasses.replace(model, config=config,
                               params=family.params(config, model.shape(table)[0], model.model_type),
                               read=lambda key, layer=None, expert=None: model.read(source(key), layer, expert),
                               shape=lambda key: model.shape(source(key)))


def common_state(model: Model, tokenizer: str | None) -> dict:
    return {"kiln": {"step": 0, "model": overrides.to_dict(model.config), "hf_model_type": model.model_type,
                     "tokenizer": tokenizer, "save_id": uuid.uuid4().hex}}


def hf_entries(model: Model, dtype: torch.dtype) -> list[Entry]:
    """The HF tensors a model becomes, in writing order, from shapes alone (meta tensors)."""
    entries = []
    for p, layer, expert in _hf_order(model):
        shape = model.shape(p.megatron)
        meta = torch.empty(shape[1 + bool(p.experts):] if p.per_layer else shape, device="meta")
        for name, t in zip(p.hf_names(layer, expert), p.transform.to_hf(meta), strict=True):
            entries.append(Entry(name, tuple(t.shape), dtype))
    return entries


def _hf_order(model: Model):
    """(param, layer, expert) in the order HF tensors are written: each tensor, then each layer that has
    it, then each expert, so one expert of one layer is in memory at a time."""
    for p in model.params:
        for layer in (p.layer_indices(model.config.num_layers) if p.per_layer else [None]):
            for expert in p.expert_indices():
                yield p, layer, expert


def write_hf(model: Model, out: Path, dtype: torch.dtype, max_shard_bytes: int, progress) -> None:
    writer = hf.Writer(out, hf_entries(model, dtype), max_shard_bytes)
    for p, layer, expert in _hf_order(model):
        region = model.read(p.megatron, layer, expert)
        for name, tensor in zip(p.hf_names(layer, expert), p.transform.to_hf(region), strict=True):
            tensor = tensor.to(dtype)
            writer.add(name, tensor)
            progress(tensor.numel() * tensor.element_size())
    writer.finish()
    family = families.for_model_type(model.model_type, model.describe)
    config = {**family.hf_config(model.config, model.model_type), **hf.special_token_ids(model.tokenizer)}
    hf.write_config(out, config, dtype)
    hf.copy_tokenizer(model.tokenizer, out)


def total_bytes(model: Model, dtype: torch.dtype) -> int:
    return parameter_count(model) * torch.tensor([], dtype=dtype).element_size()


def parameter_count(model: Model) -> int:
    """Weights a model holds: a tensor that only some layers have (an MoE model's dense MLP) counts there."""
    total = 0
    for p in model.params:
        shape = model.shape(p.megatron)
        layers = len(p.layer_indices(model.config.num_layers)) if p.per_layer else shape[0]
        total += layers * int(torch.Size(shape[1:]).numel())
    return total
