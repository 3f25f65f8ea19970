"""kiln's Megatron checkpoints (megatron-core dist_checkpointing, torch_dist backend), file level.

A directory holds `metadata.json` (the backend), `common.pt` (non-tensor state: kiln's step,
the model config) and a DCP checkpoint of global tensors whose layers are stacked on dim 0, so
it loads into any TP/PP layout; the vocabulary rows are padded for the target TP. Linear layers
also save an `_extra_state` object per layer (TransformerEngine keeps FP8 metadata there; the
local spec saves None), which megatron-core requires to be present; so does TE's final norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.conversion import dcp
from kiln.errors import MegatronFormatError
from kiln.training import checkpoint as ckpt

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
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
