"""Model presets: the published shapes of each family, as ModelConfigs."""

from __future__ import annotations

from kiln.config import ModelConfig


def gpt2(num_layers: int, hidden_size: int, heads: int, **overrides) -> ModelConfig:
    """GPT-2: LayerNorm, tanh-GELU, learned positions, tied embeddings, biases everywhere."""
    fields = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=heads,
        vocab_size=50257, max_position_embeddings=1024,
        normalization="LayerNorm", norm_epsilon=1e-5, activation="gelu_tanh",
        position_embedding="learned_absolute", tie_embeddings=True, add_bias_linear=True,
    )
    return ModelConfig(**{**fields, **overrides})


def llama(num_layers: int, hidden_size: int, heads: int, kv_heads: int, ffn: int, **overrides) -> ModelConfig:
    """Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases."""
    fields = dict(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=heads,
        num_query_groups=kv_heads, ffn_hidden_size=ffn,
        normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu",
        position_embedding="rope", rotary_base=500_000, tie_embeddings=False,
        add_bias_linear=False,
    )
    return ModelConfig(**{**fields, **overrides})


def gpt2_124m() -> ModelConfig:
    return gpt2(12, 768, 12)


def llama3_8b() -> ModelConfig:
    return llama(32, 4096, 32, 8, 14336, vocab_size=128256, max_position_embeddings=8192)


def llama3_70b() -> ModelConfig:
    return llama(80, 8192, 64, 8, 28672, vocab_size=128256, max_position_embeddings=8192)


def tiny_llama() -> ModelConfig:
    """Llama-shaped, small enough for seconds per step on two CPU cores. The vocabulary pads to
    multiples of 256 x TP, so the demo's ~770-token vocabulary has the same 1024 rows at TP 1, 2
    and 4, and its checkpoints move between those layouts."""
    return llama(4, 128, 4, 2, 384, rotary_base=10_000, max_position_embeddings=256, init_method_std=0.02,
                 make_vocab_size_divisible_by=256)
