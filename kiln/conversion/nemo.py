"""NeMo checkpoint layouts, written and read by kiln (see kiln/conversion/README.md for sources).

- NeMo 2 directory: `context/` (`io.json`, which NeMo's `load_context` rebuilds the model from,
  `model.yaml`, the tokenizer in `nemo_tokenizer/`; see kiln.conversion.nemo_context) and
  `weights/`, a megatron-core torch_dist checkpoint whose keys carry the Lightning wrapper's
  `module.` prefix.
- `.nemo` archive (NeMo 1 / NeMo-Aligner era): a tar of `model_config.yaml` (MegatronGPTModel's
  config) and `model_weights/`, a torch_dist checkpoint whose keys carry the `model.` prefix.

Archives are opened defensively: absolute paths, `..` components and links are refused before
anything is extracted, and extraction then runs with tarfile's "data" filter as well.
"""

from __future__ import annotations

import atexit
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import yaml

from kiln.config import ModelConfig
from kiln.conversion import dcp, hf, megatron, nemo_context
from kiln.errors import NemoFormatError

NEMO2_PREFIX = "module."
NEMO1_PREFIX = "model."
ARCHIVE_NAME = "model.nemo"
UNTIED_FAMILIES = ("qwen2", "mistral")  # NeMo 2.7.3 imports these untied; its exporters need output_layer


def nemo1_config(m: ModelConfig, rows: int, tokenizer: str | None) -> dict:
    """MegatronGPTModel's config (NeMo 1 naming) as NeMo-Aligner 0.7.0's loader needs it (requirements
    and their sources: kiln/conversion/README.md; checked one by one in tests/conversion/test_roundtrip.py)."""
    config = {
        "mcore_gpt": True, "transformer_engine": True, "precision": "bf16", "dist_ckpt_format": "torch_dist",
        "micro_batch_size": 1, "global_batch_size": 1,
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "encoder_seq_length": m.max_position_embeddings, "max_position_embeddings": m.max_position_embeddings,
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_size,
        "num_attention_heads": m.num_attention_heads, "num_query_groups": m.heads_kv, "kv_channels": m.head_dim,
        "init_method_std": m.init_method_std, "hidden_dropout": m.hidden_dropout,
        "attention_dropout": m.attention_dropout, "ffn_dropout": 0.0,
        "normalization": {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}[m.normalization],
        "layernorm_epsilon": m.norm_epsilon, "bias": m.add_bias_linear, "qkv_bias": m.add_qkv_bias,
        "activation": {"swiglu": "fast-swiglu", "gelu": "gelu", "gelu_tanh": "gelu"}[m.activation],
        "openai_gelu": m.activation == "gelu_tanh",
        # megatron-core fuses only gelu and swiglu with the bias; openai_gelu must not be fused
        "bias_activation_fusion": m.activation != "gelu_tanh",
        "position_embedding_type": m.position_embedding, "rotary_base": m.rotary_base,
        "rotary_percentage": m.rotary_percent, "scale_positional_embedding": m.rope_scaling is not None,
        "share_embeddings_and_output_weights": m.tie_embeddings,
        # the table's rows exactly: NeMo would otherwise pad len(tokenizer) for its own TP
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by, "override_vocab_size": rows,
        "apply_query_key_layer_scaling": False,
        # NeMo 1 reads an HF tokenizer only by name or directory (`type`), never from inside the archive
        "tokenizer": {"library": "huggingface", "type": str(Path(tokenizer).resolve()) if tokenizer else None,
                      "use_fast": True},
        "optim": {"name": "fused_adam", "lr": 1.0e-5},  # MegatronBaseModel reads optim.name at construction
    }
    if m.rope_scaling is not None:
        s = m.rope_scaling
        config.update(scale_factor=s.factor, low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                      old_context_len=s.original_max_position_embeddings)
    return config


def write_nemo2(out: Path, model, chunks: list[dcp.Chunk], common: dict, vocab_rows: int, dtype: str) -> None:
    """NeMo 2's layout as its own importer writes it: `context/` (io.json, model.yaml, the tokenizer in
    nemo_tokenizer/) and `weights/` (the vocabulary unpadded)."""
    context = out / "context"
    context.mkdir(parents=True)
    hf.copy_tokenizer(model.tokenizer, _mkdir(context / nemo_context.TOKENIZER_DIR))
    nemo_context.write_context(context, model.config, model.model_type, vocab_rows, dtype)
    megatron.write(out / "weights", chunks, common)


def open_nemo2(path: Path):
    """A reader of a NeMo 2 checkpoint's weights, its model config (from context/model.yaml: NeMo's
    own checkpoints carry no kiln state) and its tokenizer directory if it has one."""
    reader, _ = megatron.open_checkpoint(path / "weights")
    rows = reader.shape(NEMO2_PREFIX + "embedding.word_embeddings.weight")[0]
    config = nemo_context.read_model_config(path / "context", rows)
    tokenizer = path / "context" / nemo_context.TOKENIZER_DIR
    return reader, config, str(tokenizer) if (tokenizer / "tokenizer.json").exists() else None


def write_nemo_archive(out: Path, model, chunks: list[dcp.Chunk], common: dict) -> None:
    """`out/model.nemo`, built from a staging directory beside it."""
    staging = out / "staging"
    staging.mkdir(parents=True)
    rows = model.shape("embedding.word_embeddings.weight")[0]
    config = nemo1_config(model.config, rows, model.tokenizer)
    (staging / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    hf.copy_tokenizer(model.tokenizer, _mkdir(staging / "tokenizer"))
    megatron.write(staging / "model_weights", chunks, common)
    with tarfile.open(out / ARCHIVE_NAME, "w") as tar:
        for item in sorted(staging.rglob("*")):
            tar.add(item, arcname=f"./{item.relative_to(staging)}", recursive=False)
    shutil.rmtree(staging)


def safe_extract(archive: Path, target: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = PurePosixPath(member.name)
            if name.is_absolute() or member.name.startswith(("/", "\\")):
                raise NemoFormatError(f"{archive}: member {member.name!r} has an absolute path; refusing to extract")
            if ".." in name.parts:
                raise NemoFormatError(f"{archive}: member {member.name!r} escapes the target directory; refusing")
            if member.issym() or member.islnk():
                raise NemoFormatError(f"{archive}: member {member.name!r} is a link; .nemo archives hold files only")
            if not (member.isfile() or member.isdir()):
                raise NemoFormatError(f"{archive}: member {member.name!r} is not a regular file or directory")
        tar.extractall(target, filter="data")


def open_nemo_archive(archive: Path):
    """Extracts into a temp dir that lives as long as the returned reader's process."""
    target = Path(tempfile.mkdtemp(prefix="kiln-nemo-"))
    atexit.register(shutil.rmtree, target, True)
    try:
        safe_extract(archive, target)
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if not (target / "model_config.yaml").exists() or not (target / "model_weights").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        raise NemoFormatError(f"{archive}: no model_config.yaml and model_weights/; not a NeMo GPT checkpoint")
    reader, common = megatron.open_checkpoint(target / "model_weights")
    tokenizer = target / "tokenizer"
    return reader, common, str(tokenizer) if (tokenizer / "tokenizer.json").exists() else None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
