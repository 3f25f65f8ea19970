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


def model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """config.json as the pinned transformers reads it (hf_class_config): RoPE from either config
    generation, and nothing that changes the math defaulted by kiln or dropped."""
    cfg = hf_class_config(hf, where)
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act={cfg.hidden_act!r}: the Llama family converts with silu only")
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError(f"{where}: mlp_bias=true: kiln's Llama models have no MLP biases; this model cannot "
                          f"be converted without changing it")
    _refuse_sliding_window(cfg, where)
    rope = _rope(cfg, where)
    heads = cfg.num_attention_heads
    return ModelConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size, num_attention_heads=heads,
        num_query_groups=cfg.num_key_value_heads or heads,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, activation="swiglu",
        position_embedding="rope", rotary_base=rope["base"], rope_scaling=rope["scaling"],
        tie_embeddings=bool(cfg.tie_word_embeddings), add_bias_linear=False,
        add_qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        init_method_std=cfg.initializer_range,
    )


REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")


def hf_class_config(hf: dict, where: str):
    """The model's transformers config class built from config.json: both config generations (top-level
    rope_theta / rope_scaling of transformers 4, rope_parameters of 5) become rope_parameters, and a
    field the file omits takes that class's default, as transformers itself would load the model. The
    shape fields have no meaningful default: their absence is refused."""
    from transformers import AutoConfig

    missing = [key for key in REQUIRED if key not in hf]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} missing; a {hf.get('model_type')} config.json names them")
    return AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})


def _rope(cfg, where: str) -> dict:
    params = cfg.rope_parameters
    kind = params.get("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        raise ConfigError(f"{where}: rope_parameters has no rope_theta; name the RoPE base")
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise ConfigError(f"{where}: RoPE type {kind!r} is not one kiln models (default, llama3); converting it "
                          f"would change the model")
    base = float(params["rope_theta"])
    if not base.is_integer():
        raise ConfigError(f"{where}: rope_theta={base} is not a whole number, which kiln's model.rotary_base holds")
    return {"base": int(base), "scaling": scaling}


def _refuse_sliding_window(cfg, where: str) -> None:
    """kiln's models attend over the whole sequence: a window shorter than the positions (Mistral
    v0.1's 4096 of 32768) changes the model, so it is refused rather than dropped."""
    window = getattr(cfg, "sliding_window", None)
    used = getattr(cfg, "use_sliding_window", True)  # Qwen2 declares a window it does not use by default
    if used and window is not None and window < cfg.max_position_embeddings:
        raise ConfigError(
            f"{where}: sliding_window={window} is shorter than max_position_embeddings={cfg.max_position_embeddings}: "
            f"kiln's models attend over the whole sequence, so converting would change the model beyond "
            f"{window} tokens; use a checkpoint without sliding-window attention (Mistral v0.2+)"
        )


def hf_config(m: ModelConfig, model_type: str = "llama") -> dict:
    """config.json as the pinned transformers writes it (rope_parameters in transformers 5)."""
    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling is not None:
        s = m.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": float(m.rotary_base), "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    fields = {
        "architectures": [ARCHITECTURES[model_type]],
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.heads_kv, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon, "rope_parameters": rope, "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_method_std, "use_cache": True,
    }
    if model_type == "llama":
        fields.update(attention_bias=m.add_qkv_bias, mlp_bias=False)
    elif model_type == "mistral":  # kiln attends over the whole sequence (MistralConfig defaults to 4096)
        fields.update(sliding_window=None)
    else:  # Qwen2 declares a window it does not use unless use_sliding_window
        fields.update(use_sliding_window=False)
    config = AutoConfig.for_model(model_type, **fields).to_diff_dict()  # what save_pretrained writes
    return {key: value for key, value in config.items() if key not in ("transformers_version", "dtype", "torch_dtype")}


def params(m: ModelConfig, padded_vocab: int, model_type: str | None = None) -> list[Param]:
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
