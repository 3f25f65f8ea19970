"""The Llama family (Llama 2/3/3.x, Mistral, Qwen2): HF config <-> ModelConfig, and weight names.

RMSNorm, SwiGLU, RoPE (HF's rotate-half convention equals megatron-core's non-interleaved one),
grouped-query attention, optional q/k/v bias (Qwen2), tied or untied embeddings, Llama 3.1 RoPE
scaling.
"""

from __future__ import annotations

from kiln.config import ModelConfig, RopeScaling
from kiln.conversion.mapping import GateUp, InterleavedQKV, PaddedVocab, Param
from kiln.errors import ConfigError

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def model_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}: the Llama family converts with silu only")
    scaling = hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(f"config.json rope_scaling type {kind!r} is not supported; kiln converts llama3 scaling")
        rope_scaling = RopeScaling(
            factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    heads = hf["num_attention_heads"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", heads),
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"],
        normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-6), activation="swiglu",
        position_embedding="rope", rotary_base=int(hf.get("rope_theta", 10000)), rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), add_bias_linear=False,
        add_qkv_bias=hf["model_type"] == "qwen2" or bool(hf.get("attention_bias", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )


def hf_config(m: ModelConfig, model_type: str = "llama") -> dict:
    config = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.heads_kv, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon, "rope_theta": float(m.rotary_base), "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_method_std,
        "attention_bias": m.add_qkv_bias and model_type != "qwen2", "mlp_bias": False,
        "torch_dtype": "float32", "use_cache": True,
    }
    if m.rope_scaling is not None:
        s = m.rope_scaling
        config["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                  "high_freq_factor": s.high_freq_factor,
                                  "original_max_position_embeddings": s.original_max_position_embeddings}
    return config


def params(m: ModelConfig, padded_vocab: int) -> list[Param]:
    qkv = InterleavedQKV(m.num_attention_heads, m.heads_kv, m.head_dim)
    vocab = PaddedVocab(m.vocab_size, padded_vocab)
    layer = "model.layers.{i}."
    out = [
        Param("embedding.word_embeddings.weight", ["model.embed_tokens.weight"], vocab),
        Param("decoder.layers.self_attention.linear_qkv.layer_norm_weight", [layer + "input_layernorm.weight"]),
        Param("decoder.layers.self_attention.linear_qkv.weight",
              [layer + f"self_attn.{p}_proj.weight" for p in "qkv"], qkv),
        Param("decoder.layers.self_attention.linear_proj.weight", [layer + "self_attn.o_proj.weight"]),
        Param("decoder.layers.mlp.linear_fc1.layer_norm_weight", [layer + "post_attention_layernorm.weight"]),
        Param("decoder.layers.mlp.linear_fc1.weight",
              [layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"], GateUp()),
        Param("decoder.layers.mlp.linear_fc2.weight", [layer + "mlp.down_proj.weight"]),
        Param("decoder.final_layernorm.weight", ["model.norm.weight"]),
    ]
    if m.add_qkv_bias:
        out.append(Param("decoder.layers.self_attention.linear_qkv.bias",
                         [layer + f"self_attn.{p}_proj.bias" for p in "qkv"], qkv))
    if not m.tie_embeddings:
        out.append(Param("output_layer.weight", ["lm_head.weight"], vocab))
    return out
