"""Tiny random models built locally with transformers (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
ROPE_31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}


def build(kind: str, directory: Path, std: float = 0.05, **overrides) -> Path:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0, **overrides))
    else:
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
        model = model_cls(config_cls(**{**LLAMA, "tie_word_embeddings": False, **overrides}))
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows in the logits
        for p in model.parameters():
            p.normal_(0, std)
    model.save_pretrained(directory)
    return directory


VARIANTS = {
    "llama_gqa": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama31_rope_scaling": ("llama", {"rope_theta": 500000.0, "rope_scaling": ROPE_31}),
    "mistral": ("mistral", {}),
    "qwen2_qkv_bias": ("qwen2", {}),
    "gpt2": ("gpt2", {}),
}
