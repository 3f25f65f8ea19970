"""The global shape of every weight a model config implies, and the check of a checkpoint
against them before launch.

megatron-core's dist-checkpointing stores each tensor at its global shape (layers stacked on a
leading axis), so a checkpoint's metadata tells, without loading anything or starting a process
group, whether its weights fit the model a run will build. A mismatch found here is one line
naming the tensor, both shapes and the config field to change; found by megatron-core on the
ranks, it is a CheckpointingException traceback from every rank.
"""

from __future__ import annotations

from pathlib import Path

from kiln.artifact import resolve_checkpoint
from kiln.config import ModelConfig
from kiln.errors import CheckpointError
from kiln.validation import Check, Problems

# which config fields set each tensor's shape, for the fix a mismatch names
_FIELDS = {
    "word_embeddings": "model.hidden_size (columns) or the vocabulary (rows)",
    "position_embeddings": "model.max_position_embeddings (rows) or model.hidden_size",
    "linear_qkv": "model.hidden_size, model.num_attention_heads, model.num_query_groups or model.kv_channels",
    "linear_proj": "model.hidden_size, model.num_attention_heads or model.kv_channels",
    "linear_fc1": "model.hidden_size, model.ffn_hidden_size or model.activation",
    "linear_fc2": "model.hidden_size or model.ffn_hidden_size",
    "layernorm": "model.hidden_size",
    "output_layer": "model.hidden_size (columns) or the vocabulary (rows)",
}


def global_shapes(m: ModelConfig, padded_vocab: int | None) -> dict[str, tuple[int, ...]]:
    """megatron-core GPTModel sharded-state-dict keys -> global shapes (local and TE specs)."""
    h, d, L = m.hidden_size, m.head_dim, m.num_layers
    qkv = (m.num_attention_heads + 2 * m.heads_kv) * d
    fc1 = m.ffn_size * (2 if m.activation == "swiglu" else 1)
    layer = "decoder.layers."
    shapes = {
        f"{layer}self_attention.linear_qkv.weight": (L, qkv, h),
        f"{layer}self_attention.linear_proj.weight": (L, h, m.num_attention_heads * d),
        f"{layer}mlp.linear_fc1.weight": (L, fc1, h),
        f"{layer}mlp.linear_fc2.weight": (L, h, m.ffn_size),
        "decoder.final_layernorm.weight": (h,),
    }
    norms = ("input_layernorm", "pre_mlp_layernorm", "self_attention.linear_qkv.layer_norm",
             "mlp.linear_fc1.layer_norm")
    for norm in norms:  # local spec: separate norms; TE spec: fused into the next linear
        weight = f"{layer}{norm}_weight" if "." in norm else f"{layer}{norm}.weight"
        shapes[weight] = (L, h)
        if m.normalization == "LayerNorm":
            shapes[weight.replace("weight", "bias")] = (L, h)
    if m.normalization == "LayerNorm":
        shapes["decoder.final_layernorm.bias"] = (h,)
    if m.add_bias_linear or m.add_qkv_bias:
        shapes[f"{layer}self_attention.linear_qkv.bias"] = (L, qkv)
    if m.add_bias_linear:
        shapes[f"{layer}self_attention.linear_proj.bias"] = (L, h)
        shapes[f"{layer}mlp.linear_fc1.bias"] = (L, fc1)
        shapes[f"{layer}mlp.linear_fc2.bias"] = (L, h)
    if m.position_embedding == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (m.max_position_embeddings, h)
    if padded_vocab is not None:
        shapes["embedding.word_embeddings.weight"] = (padded_vocab, h)
        if not m.tie_embeddings:
            shapes["output_layer.weight"] = (padded_vocab, h)
    return shapes


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Global tensor shapes from a checkpoint's metadata (no tensor is read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}


def saved_model_config(path: Path) -> dict | None:
    """The model config kiln recorded in a checkpoint's common state, if any."""
    import torch

    common = path / "common.pt"
    if not common.exists():
        return None
    state = torch.load(common, map_location="cpu", weights_only=True)
    return (state.get("kiln") or {}).get("model")


def check_weights(field_name: str, source: str, m: ModelConfig, padded_vocab: int | None, check: Check,
                  problems: Problems, scalar_head: bool = False) -> None:
    """Every tensor the checkpoint at `source` shares with the model has the model's shape."""
    if not check.will_exist(source):
        check.missing(problems,
                      f"{field_name}={source} does not exist: give a checkpoint directory (a run's checkpoints/, "
                     f"an iter_* directory, or `kiln convert --to megatron` output)")
        return
    if not Path(source).exists():
        return  # an earlier stage of this pipeline writes it
    try:
        path = resolve_checkpoint(source)
    except CheckpointError as exc:
        problems.add(f"{field_name}: {exc}")
        return
    expected = global_shapes(m, None if scalar_head else padded_vocab)
    if scalar_head:
        expected.pop("output_layer.weight", None)
    saved = saved_shapes(path)
    recorded = _recorded_model(path)
    for key, shape in expected.items():
        found = saved.get(key)
        if found is None or found == shape:
            continue
        if key.endswith("word_embeddings.weight") and found[1:] == shape[1:]:
            rows = found[0]
            problems.add(f"{field_name}={source}: the checkpoint pads the vocabulary to {rows} rows, this model to "
                         f"{shape[0]}: set model.make_vocab_size_divisible_by so they match (or convert with the "
                         f"--tp this run uses)")
            return
        differs = _differences(recorded, m) if recorded else []
        part = next((name for name in _FIELDS if name in key), "layernorm")
        fix = (f"the checkpoint was saved with {', '.join(differs)}: set those" if differs
               else f"set {_FIELDS[part]} to the checkpoint's")
        problems.add(f"{field_name}={source}: tensor {key} is {list(found)} in {path.name} but this model "
                     f"makes it {list(shape)}; {fix}")
        return  # one tensor names the mismatch; the rest follow from it


def _recorded_model(path: Path) -> ModelConfig | None:
    from kiln import overrides

    recorded = saved_model_config(path)
    try:
        return overrides.from_dict(ModelConfig, recorded) if recorded else None
    except Exception:  # noqa: BLE001 -- another kiln's record: the shapes alone still name the tensor
        return None


def _differences(saved: ModelConfig, m: ModelConfig) -> list[str]:
    """Fields whose effective values differ (kv_channels=None and 32 are the same head size)."""
    fields = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_size": "ffn_hidden_size",
              "num_attention_heads": "num_attention_heads", "heads_kv": "num_query_groups",
              "head_dim": "kv_channels", "activation": "activation", "normalization": "normalization"}
    return [f"model.{name}={getattr(saved, attr)}" for attr, name in fields.items()
            if getattr(saved, attr) != getattr(m, attr)]
