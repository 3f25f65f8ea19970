"""Model presets: the published shapes of each family, as ModelConfigs."""

from __future__ import annotations

from kiln.config import ModelConfig, MoEConfig


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


def mixtral(num_layers: int, hidden_size: int, heads: int, kv_heads: int, ffn: int, experts: int, topk: int,
            **overrides) -> ModelConfig:
    """Mixtral: a Llama whose every MLP is `experts` SwiGLU experts, `topk` per token, softmax router
    with the top-k weights renormalised, a load-balancing auxiliary loss."""
    moe = MoEConfig(num_experts=experts, topk=topk, score_function="softmax", normalize_topk=True,
                    load_balancing="aux_loss", aux_loss_coeff=0.02)
    return llama(num_layers, hidden_size, heads, kv_heads, ffn, moe=moe, rotary_base=1_000_000, **overrides)


def mixtral_8x7b() -> ModelConfig:
    """46.7B parameters, 12.9B active per token (mistralai/Mixtral-8x7B-v0.1's config.json)."""
    return mixtral(32, 4096, 32, 8, 14336, experts=8, topk=2, vocab_size=32000, max_position_embeddings=32768)


def qwen3_30b_a3b() -> ModelConfig:
    """Qwen3-30B-A3B: 48 layers of 128 experts (768 wide), 8 per token, 3.3B active of 30.5B;
    128-dim heads wider than hidden/heads, RMSNorm on queries and keys (Qwen/Qwen3-30B-A3B's config.json)."""
    moe = MoEConfig(num_experts=128, topk=8, ffn_hidden_size=768, score_function="softmax", normalize_topk=True,
                    load_balancing="aux_loss", aux_loss_coeff=0.001)
    return llama(48, 2048, 32, 4, 6144, moe=moe, kv_channels=128, qk_layernorm=True, norm_epsilon=1e-6,
                 rotary_base=1_000_000, vocab_size=151936, max_position_embeddings=40960)


def tiny_moe() -> ModelConfig:
    """The tiny Llama with 4 SwiGLU experts of half its MLP width, 2 per token: the same active MLP
    width as `tiny_llama`, so the two compare step for step."""
    model = tiny_llama()
    model.moe = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=192, aux_loss_coeff=0.01)
    return model
