"""Published model configs (the fields that set the math, as their config.json on the Hub gives them),
cut to a test's size: 2 layers, 4 heads of 32, a 1000-token vocabulary, random weights, saved by the
pinned transformers (which writes RoPE as transformers 5's `rope_parameters`). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

PUBLISHED = {
    "llama-3.1-8b": ("llama", dict(num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                   rope_scaling={**LLAMA3_SCALING, "factor": 8.0}, rms_norm_eps=1e-5,
                                   max_position_embeddings=131072, tie_word_embeddings=False)),
    "llama-3.2-1b": ("llama", dict(num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                   rope_scaling={**LLAMA3_SCALING, "factor": 32.0}, rms_norm_eps=1e-5,
                                   max_position_embeddings=131072, tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                                   rms_norm_eps=1e-6, max_position_embeddings=32768, sliding_window=32768,
                                   use_sliding_window=False, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                                 rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window=131072,
                                 use_sliding_window=False, tie_word_embeddings=False)),
    "mistral-7b-v0.3": ("mistral", dict(num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0,
                                        rms_norm_eps=1e-5, max_position_embeddings=32768, sliding_window=None,
                                        tie_word_embeddings=False)),
    "gpt2": ("gpt2", dict(n_head=12, n_positions=1024, layer_norm_epsilon=1e-5)),
}
# kiln does not model sliding-window attention: this one must be refused, not converted without it
MISTRAL_V01 = ("mistral", dict(num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                               max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False))


def build(name: str, directory: Path, spec: tuple | None = None) -> Path:
    """The published config `name`, cut to 2 layers and 4 heads of 32 (KV heads in the same ratio)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = spec or PUBLISHED[name]
    fields = dict(fields)
    torch.manual_seed(0)
    if kind == "gpt2":
        fields.update(n_head=4, n_embd=128, n_layer=2, vocab_size=1000)
    else:
        ratio = fields["num_attention_heads"] // fields["num_key_value_heads"]
        fields.update(num_attention_heads=4, num_key_value_heads=max(1, 4 // ratio), hidden_size=128, head_dim=32,
                      intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **fields))
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows in the logits
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(directory)
    return directory
