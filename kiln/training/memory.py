"""A per-rank memory estimate for `--dryrun`: weights, gradients, optimizer state, activations.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") for a layer without recomputation; attention scores count only
without flash attention (the local CPU spec). It is a planning figure, not a measurement:
allocator fragmentation and communication buffers come on top.
"""

from __future__ import annotations

from kiln.config import PretrainConfig

GiB = 1024**3


def layer_params(cfg: PretrainConfig) -> int:
    m = cfg.model
    q = m.num_attention_heads * m.head_dim
    kv = 2 * m.heads_kv * m.head_dim
    mlp_in = m.ffn_size * (2 if m.activation == "swiglu" else 1)
    h = m.hidden_size
    weights = h * (q + kv) + q * h + h * mlp_in + m.ffn_size * h
    biases = (q + kv) * (m.add_bias_linear or m.add_qkv_bias) + (h * 2 + mlp_in) * m.add_bias_linear
    norms = 2 * m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    return weights + biases + norms


def total_params(cfg: PretrainConfig) -> int:
    m = cfg.model
    vocab = m.padded_vocab_size(1)
    embed = vocab * m.hidden_size + (m.max_position_embeddings * m.hidden_size
                                     if m.position_embedding == "learned_absolute" else 0)
    output = 0 if m.tie_embeddings else vocab * m.hidden_size
    return embed + m.num_layers * layer_params(cfg) + output + m.hidden_size * 2


def estimate(cfg: PretrainConfig, world_size: int, precision: str, flash_attention: bool) -> dict:
    """Bytes per rank on the busiest pipeline stage (the first or the last)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    dp = p.dp(world_size)
    vocab = m.padded_vocab_size(tp)
    layers_per_stage = m.num_layers // pp
    stage_layers = layers_per_stage * layer_params(cfg) / tp
    embedding = vocab * m.hidden_size / tp
    positions = m.max_position_embeddings * m.hidden_size if m.position_embedding == "learned_absolute" else 0
    first = stage_layers + embedding + positions
    last = stage_layers + (0 if (m.tie_embeddings and pp == 1) else vocab * m.hidden_size / tp)
    params = max(first, last) if pp > 1 else stage_layers + embedding + positions + (
        0 if m.tie_embeddings else vocab * m.hidden_size / tp)

    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    weight_bytes = params * act_bytes
    grad_bytes = params * 4  # megatron-core DDP reduces gradients in fp32
    optimizer_per_param = 8 + (4 if precision != "fp32" else 0)  # Adam moments (+ fp32 master)
    optimizer_bytes = params * optimizer_per_param / (dp if cfg.optimizer.distributed else 1)
    if not t.steps:  # eval-only builds no optimizer
        optimizer_bytes = 0

    s, b, h, a = t.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    per_layer = s * b * h * ((34 / tp) if p.sequence_parallel else (10 + 24 / tp))
    if not flash_attention:
        per_layer += 5 * a * s * s * b / tp
    per_layer *= act_bytes / 2  # the formula counts 2-byte activations
    microbatches = cfg.num_microbatches(world_size)
    in_flight = min(pp, microbatches)  # 1F1B keeps up to PP microbatches alive on the first stage
    activation_bytes = per_layer * layers_per_stage * in_flight
    logits_bytes = s * b * vocab / tp * 4 * 2  # fp32 logits and their gradient, last stage
    total = weight_bytes + grad_bytes + optimizer_bytes + activation_bytes + logits_bytes
    return {
        "parameters_total": total_params(cfg),
        "parameters_per_rank": int(params),
        "weights_gib": weight_bytes / GiB,
        "gradients_gib": grad_bytes / GiB,
        "optimizer_gib": optimizer_bytes / GiB,
        "activations_gib": (activation_bytes + logits_bytes) / GiB,
        "total_gib": total / GiB,
    }
