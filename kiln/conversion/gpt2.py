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


def model_config(hf: dict) -> ModelConfig:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"config.json activation_function={hf['activation_function']!r}: kiln converts GPT-2 "
                          f"with the tanh GELU (gelu_new)")
    h = hf["n_embd"]
    return ModelConfig(
        num_layers=hf["n_layer"], hidden_size=h, ffn_hidden_size=hf.get("n_inner") or 4 * h,
        num_attention_heads=hf["n_head"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["n_positions"], normalization="LayerNorm",
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh",
        position_embedding="learned_absolute", tie_embeddings=True, add_bias_linear=True,
        init_method_std=hf.get("initializer_range", 0.02),
    )


def hf_config(m: ModelConfig, model_type: str = "gpt2") -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": m.hidden_size,
        "n_layer": m.num_layers, "n_head": m.num_attention_heads, "n_inner": m.ffn_size,
        "n_positions": m.max_position_embeddings, "n_ctx": m.max_position_embeddings,
        "vocab_size": m.vocab_size, "layer_norm_epsilon": m.norm_epsilon,
        "activation_function": "gelu_new", "initializer_range": m.init_method_std,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def params(m: ModelConfig, padded_vocab: int) -> list[Param]:
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
