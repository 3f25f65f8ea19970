"""kiln's Megatron checkpoints (megatron-core dist_checkpointing, torch_dist backend), file level.

A directory holds `metadata.json` (the backend), `common.pt` (non-tensor state: kiln's step,
the model config) and a DCP checkpoint of global tensors whose layers are stacked on dim 0, so
it loads into any TP/PP layout; the vocabulary rows are padded for the target TP. Linear layers
also save an `_extra_state` object per layer (TransformerEngine keeps FP8 metadata there; the
local spec saves None), which megatron-core requires to be present; so does TE's final norm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.conversion import dcp
from kiln.errors import MegatronFormatError
from kiln.training import checkpoint as ckpt

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
LAYERS = "decoder.layers."
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2")


def extra_state_chunks(num_layers: int, prefix: str = "") -> list[dcp.Chunk]:
    """Every `_extra_state` object megatron-core's TransformerEngine layer spec names (derived
    and checked in tests/conversion/te_spec.py): the four linears per layer, stacked like the
    layers, and the final norm (TENorm), unstacked. Each holds None: no FP8 state was ever
    recorded, which TE's set_extra_state reads as "nothing saved". So a converted checkpoint
    loads strictly into the TE spec on GPU as into the local spec on CPU."""
    per_layer = [
        dcp.Chunk(f"{prefix}decoder.layers.{module}._extra_state/shard_{layer}_{num_layers}", (), None, None, None,
                  lambda: [None])
        for module in EXTRA_STATE_MODULES for layer in range(num_layers)
    ]
    final_norm = dcp.Chunk(f"{prefix}decoder.final_layernorm._extra_state/shard_0_1", (), None, None, None,
                           lambda: [None])
    return [*per_layer, final_norm]


def per_layer_keys(m: ModelConfig) -> bool:
    """Whether megatron-core names each layer's tensors apart (`decoder.layers.<i>.<name>`, not stacked):
    it does when the layers differ, i.e. an MoE model with a dense/MoE pattern, which the engine hands
    megatron-core as a list `moe_layer_freq` (TransformerBlock.sharded_state_dict's
    non_homogeneous_layers). Every other model stacks its layers on dim 0."""
    return m.moe is not None and m.moe.layer_pattern is not None


def stored_at(key: str, layer: int | None, expert: int | None, per_layer: bool) -> tuple[str, tuple[int, ...]]:
    """Where a layer's (and expert's) region of a global-view key lives on disk: the stored key and the
    leading indices into it. Routed experts carry their global expert id on the axis after the layer's."""
    index = () if expert is None else (expert,)
    if layer is None:
        return key, index
    if per_layer:
        return key.replace(LAYERS, f"{LAYERS}{layer}.", 1), index
    return key, (layer, *index)


def global_key(stored: str) -> tuple[str, int | None]:
    """A stored key's global-view key, and its layer when the layer is in the name."""
    match = _LAYER_KEY.match(stored)
    if match is None:
        return stored, None
    return LAYERS + match.group(2), int(match.group(1))


def extra_state_chunks_for(m: ModelConfig, prefix: str = "") -> list[dcp.Chunk]:
    """`extra_state_chunks` for any model: an MoE layer's linears are its routed experts' (one object per
    expert, at its global id) and its shared expert's; a dense layer's are the MLP's; names as
    megatron-core's local spec saves them (SequentialMLP.sharded_state_dict), stacked or per layer."""
    if m.moe is None:
        return extra_state_chunks(m.num_layers, prefix)
    per_layer, n, experts = per_layer_keys(m), m.num_layers, m.moe.num_experts
    chunks = []

    def add(module: str, layer: int, expert: int | None = None) -> None:
        offsets, shape = ((layer,), (n,)) if not per_layer else ((0,), (1,))
        if expert is not None:
            offsets, shape = (offsets + (expert,), shape + (experts,)) if not per_layer else ((expert,), (experts,))
        key = f"{LAYERS}{layer}.{module}" if per_layer else f"{LAYERS}{module}"
        shard = f"shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"
        chunks.append(dcp.Chunk(f"{prefix}{key}._extra_state/{shard}", (), None, None, None, lambda: [None]))

    for layer in range(n):
        for module in EXTRA_STATE_MODULES[:2]:
            add(module, layer)
        if not m.moe.is_moe_layer(layer):
            for module in EXTRA_STATE_MODULES[2:]:
                add(module, layer)
            continue
        for module in ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2"):
            for expert in range(experts):
                add(module, layer, expert)
        if m.moe.shared_expert_ffn_size is not None:
            for module in ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"):
                add(module, layer)
    final_norm = dcp.Chunk(f"{prefix}decoder.final_layernorm._extra_state/shard_0_1", (), None, None, None,
                           lambda: [None])
    return [*chunks, final_norm]


def write(path: str | Path, chunks: list[dcp.Chunk], common: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dcp.write(path, chunks)
    torch.save(common, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps(BACKEND))


def open_checkpoint(path: str | Path) -> tuple[dcp.Reader, dict]:
    """A reader for a checkpoint (or a run's checkpoint root: its `latest`) and its common state,
    after checking that every shard file the metadata names is present."""
    path = ckpt.resolve(path)
    meta = json.loads((path / "metadata.json").read_text())
    if meta.get("sharded_backend") != "torch_dist":
        raise MegatronFormatError(f"{path}: sharded backend {meta.get('sharded_backend')!r}; kiln reads torch_dist")
    reader = dcp.Reader(path)
    missing = sorted(f for f in reader.storage_files() if not (path / f).exists())
    if missing:
        raise MegatronFormatError(
            f"{path} is missing shard files {', '.join(missing)} named by its .metadata: the checkpoint "
            f"was copied incompletely or a save was interrupted; copy it again or use an earlier iteration"
        )
    common = torch.load(path / "common.pt", map_location="cpu", weights_only=True) \
        if (path / "common.pt").exists() else {}
    return reader, common
