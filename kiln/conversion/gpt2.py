"""GPT-2: HF config <-> ModelConfig, and weight names.

LayerNorm with biases, tanh-GELU, learned positions, tied embeddings, biases on every linear;
HF's Conv1D layers store (in, out) weights and one fused [q; k; v] projection.
"""

from __future__ import annotations

from kiln.config import ModelConfig
from kiln.conversion.mapping import InterleavedQKV, PaddedVocab, Param, Same, Transposed
from kiln.errors import ConfigError

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}


def model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """config.json as the pinned transformers reads it: GPT2Config's own defaults for what the file
    omits, the shape fields required, and options that change the math refused."""
    from transformers import GPT2Config

    missing = [key for key in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions") if key not in hf]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing; a GPT-2 config.json names them")
    cfg = GPT2Config(**{k: v for k, v in hf.items() if k != "model_type"})
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{where}: activation_function={cfg.activation_function!r}: kiln converts GPT-2 with the "
                          f"tanh GELU (gelu_new)")
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(cfg, option, False):
            raise ConfigError(f"{where}: {option}=true changes GPT-2's attention, which kiln does not model")
    if not cfg.scale_attn_weights:
        raise ConfigError(f"{where}: scale_attn_weights=false: kiln's attention always scales by 1/sqrt(head dim)")
    h = cfg.n_embd
    return ModelConfig(
        num_layers=cfg.n_layer, hidden_size=h, ffn_hidden_size=cfg.n_inner or 4 * h,
        num_attention_heads=cfg.n_head, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.n_positions, normalization="LayerNorm",
        norm_epsilon=cfg.layer_norm_epsilon, activation="gelu_tanh",
        position_embedding="learned_absolute", tie_embeddings=True, add_bias_linear=True,
        init_method_std=cfg.initializer_range,
    )


def hf_config(m: ModelConfig, model_type: str = "gpt2") -> dict:
    from transformers import GPT2Config

    config = GPT2Config(
        architectures=["GPT2LMHeadModel"], n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads,
        n_inner=m.ffn_size, n_positions=m.max_position_embeddings, n_ctx=m.max_position_embeddings,
        vocab_size=m.vocab_size, layer_norm_epsilon=m.norm_epsilon, activation_function="gelu_new",
        initializer_range=m.init_method_std, tie_word_embeddings=True, use_cache=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ).to_diff_dict()  # what save_pretrained writes
    return {key: value for key, value in config.items() if key not in ("transformers_version", "dtype", "torch_dtype")}


def params(m: ModelConfig, padded_vocab: int, model_type: str | None = None) -> list[Param]:
    if not m.tie_embeddings:
        raise ConfigError("GPT-2 ties its embeddings: model.tie_embeddings must be true")
    qkv = InterleavedQKV(m.num_attention_heads, m.num_attention_heads, m.head_dim, fused_input=True)
    qkv_t = InterleavedQKV(m.num_attention_heads, m.num_attention_heads, m.head_dim, fused_input=True, transpose=True)
    h = "transformer.h.{i}."
    return [
        Param("embedding.word_embeddings.weight", ["transformer.wte.weight"], PaddedVocab(m.vocab_size, padded_vocab)),
        Param("embedding.position_embeddings.weight", ["transformer.wpe.weight"], Same()),
        Param("decoder.layers.self_attention.linear_qkv.layer_norm_weight", [h + "ln_1.weight"]),
        Param("decoder.layers.self_attention.linear_qkv.layer_norm_bias", [h + "ln_1.bias"]),
        Param("decoder.layers.self_attention.linear_qkv.weight", [h + "attn.c_attn.weight"], qkv_t),
        Param("decoder.layers.self_attention.linear_qkv.bias", [h + "attn.c_attn.bias"], qkv),
        Param("decoder.layers.self_attention.linear_proj.weight", [h + "attn.c_proj.weight"], Transposed()),
        Param("decoder.layers.self_attention.linear_proj.bias", [h + "attn.c_proj.bias"]),
        Param("decoder.layers.mlp.linear_fc1.layer_norm_weight", [h + "ln_2.weight"]),
        Param("decoder.layers.mlp.linear_fc1.layer_norm_bias", [h + "ln_2.bias"]),
        Param("decoder.layers.mlp.linear_fc1.weight", [h + "mlp.c_fc.weight"], Transposed()),
        Param("decoder.layers.mlp.linear_fc1.bias", [h + "mlp.c_fc.bias"]),
        Param("decoder.layers.mlp.linear_fc2.weight", [h + "mlp.c_proj.weight"], Transposed()),
        Param("decoder.layers.mlp.linear_fc2.bias", [h + "mlp.c_proj.bias"]),
        Param("decoder.final_layernorm.weight", ["transformer.ln_f.weight"]),
        Param("decoder.final_layernorm.bias", ["transformer.ln_f.bias"]),
    ]
