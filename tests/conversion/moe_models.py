"""Tiny random mixture-of-experts models built locally with transformers (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
VARIANTS = {
    # every layer MoE: megatron-core stacks the layers
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # shared expert with its sigmoid gate, top-k not renormalized, layer 1 dense (layers named apart)
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False)),
    # q/k norms, top-k renormalized
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8,
                                    norm_topk_prob=True)),
}


def build(kind: str, directory: Path, std: float = 0.1, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**COMMON, **overrides}))
    with torch.no_grad():  # non-trivial norms and routers, so a mapping mistake shows in the logits
        for p in model.parameters():
            p.normal_(0, std)
    model.save_pretrained(directory)
    return directory
