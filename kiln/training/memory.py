"""A per-rank memory estimate for `--dryrun`: weights, gradients, optimizer state, activations.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") for a layer without recomputation; attention scores count only
without flash attention (the local CPU spec). It is a planning figure, not a measurement:
allocator fragmentation and communication buffers come on top.
"""

from __future__ import annotations

from kiln.config import PretrainConfig

GiB = 1024**3


def _mlp_params(cfg: PretrainConfig, ffn: int) -> int:
    m = cfg.model
    mlp_in = ffn * (2 if m.activation == "swiglu" else 1)
    return m.hidden_size * mlp_in + ffn * m.hidden_size + (mlp_in + m.hidden_size) * m.add_bias_linear


def layer_split(cfg: PretrainConfig, layer: int) -> tuple[int, int]:
    """(dense, expert) parameters of one layer: dense ones are split over TP, the experts'
    over EP x expert TP (the router and a shared expert are dense)."""
    m = cfg.model
    q = m.num_attention_heads * m.head_dim
    kv = 2 * m.heads_kv * m.head_dim
    h = m.hidden_size
    attention = h * (q + kv) + q * h + (q + kv) * (m.add_bias_linear or m.add_qkv_bias) + h * m.add_bias_linear
    norms = 2 * m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    moe = m.moe
    if moe is None or not moe.is_moe_layer(layer):
        return attention + norms + _mlp_params(cfg, m.ffn_size), 0
    router = h * moe.num_experts
    shared = (_mlp_params(cfg, moe.shared_expert_ffn_size) + h * moe.shared_expert_gate
              if moe.shared_expert_ffn_size else 0)
    return attention + norms + router + shared, moe.num_experts * _mlp_params(cfg, m.expert_ffn_size)


def layer_params(cfg: PretrainConfig, layer: int = 0) -> int:
    return sum(layer_split(cfg, layer))


def total_params(cfg: PretrainConfig) -> int:
    m = cfg.model
    vocab = m.padded_vocab_size(1)
    embed = vocab * m.hidden_size + (m.max_position_embeddings * m.hidden_size
                                     if m.position_embedding == "learned_absolute" else 0)
    output = 0 if m.tie_embeddings else vocab * m.hidden_size
    layers = sum(layer_params(cfg, i) for i in range(m.num_layers))
    return embed + layers + output + m.hidden_size * 2


def active_params(cfg: PretrainConfig) -> int:
    """Parameters a token passes through: of each MoE layer's experts only its top-k."""
    m = cfg.model
    if m.moe is None:
        return total_params(cfg)
    idle = (m.moe.num_experts - m.moe.topk) * _mlp_params(cfg, m.expert_ffn_size)
    return total_params(cfg) - idle * sum(m.moe.is_moe_layer(i) for i in range(m.num_layers))


def estimate(cfg: PretrainConfig, world_size: int, precision: str, flash_attention: bool) -> dict:
    """Bytes per rank on the busiest pipeline stage (the first or the last)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    dp = p.dp(world_size)
    vocab = m.padded_vocab_size(tp)
    layers_per_stage = m.num_layers // pp
    # the busiest stage's layers: dense weights split over TP, experts over EP x expert TP
    expert_split = p.ep * (p.etp or tp)
    expert_dp = world_size // (pp * expert_split)
    stages = [range(s * layers_per_stage, (s + 1) * layers_per_stage) for s in range(pp)]
    splits = [[layer_split(cfg, i) for i in stage] for stage in stages]
    dense_layers, experts = max(((sum(d for d, _ in st) / tp, sum(e for _, e in st) / expert_split)
                                 for st in splits), key=sum)
    stage_layers = dense_layers + experts
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
    # the distributed optimizer shards dense state over DP and the experts' over expert DP
    sharded = (params - experts) / dp + experts / expert_dp if cfg.optimizer.distributed else params
    optimizer_bytes = sharded * optimizer_per_param
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
    if m.moe is not None:  # each token passes top-k experts: k copies of the expert MLP's activations
        mlp_in = m.expert_ffn_size * (2 if m.activation == "swiglu" else 1)
        moe_layers = max(sum(m.moe.is_moe_layer(i) for i in stage) for stage in stages)
        routed = s * b * m.moe.topk * (2 * h + mlp_in + m.expert_ffn_size) / (tp if p.sequence_parallel else 1)
        activation_bytes += routed * act_bytes * moe_layers * in_flight
    logits_bytes = s * b * vocab / tp * 4 * 2  # fp32 logits and their gradient, last stage
    total = weight_bytes + grad_bytes + optimizer_bytes + activation_bytes + logits_bytes
    return {
        "parameters_total": total_params(cfg),
        "parameters_per_rank": int(params),
        "parameters_active": active_params(cfg),
        "expert_parameters_per_rank": int(experts),
        "weights_gib": weight_bytes / GiB,
        "gradients_gib": grad_bytes / GiB,
        "optimizer_gib": optimizer_bytes / GiB,
        "activations_gib": (activation_bytes + logits_bytes) / GiB,
        "total_gib": total / GiB,
    }
