"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): HF config <-> ModelConfig, and weight names.

Attention, norms, RoPE and embeddings are the Llama family's; the MLP of an MoE layer is a router
(`gate`, one row per expert) and `num_experts` SwiGLU experts, plus Qwen2-MoE's always-on shared
expert scaled by sigmoid(shared_expert_gate(x)). Qwen's `mlp_only_layers` / `decoder_sparse_step`
leave some layers dense (model.moe.layer_pattern 0), with the model's ffn size.

On disk (what `save_pretrained` of transformers 5 writes, and what published checkpoints hold) each
expert is its own tensors: `block_sparse_moe.experts.{e}.w1/w3/w2` (Mixtral: gate, up, down) or
`mlp.experts.{e}.gate_proj/up_proj/down_proj` (Qwen). transformers 5 fuses them in memory into
`mlp.experts.gate_up_proj` [experts, 2 ffn, hidden] ([gate; up] per expert) and `mlp.experts.down_proj`
[experts, hidden, ffn], and renames Mixtral's `block_sparse_moe.` to `mlp.` (its conversion_mapping.py);
`module_tensor` builds those from the per-expert tensors for the layer-by-layer check.

megatron-core's routed experts (SequentialMLP, dist-checkpointing with global expert ids) are
`decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight` [layers, experts, ...]: fc1 is [gate; up]
as in a dense SwiGLU MLP. `expert_weights` reads one expert of one layer from any source.
"""

from __future__ import annotations

import re

import torch

from kiln.config import ModelConfig, MoEConfig
from kiln.conversion import llama
from kiln.conversion.mapping import GateUp, Param
from kiln.errors import ConfigError

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
SHARED_FC1 = "decoder.layers.mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "decoder.layers.mlp.shared_experts.linear_fc2.weight"
SHARED_GATE = "decoder.layers.mlp.shared_experts.gate_weight"
MOE_NORM = "decoder.layers.pre_mlp_layernorm.weight"
DENSE_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"


def model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """config.json as the pinned transformers reads it; every MoE option that changes the math is
    carried or refused, naming the field."""
    cfg = llama.hf_class_config(hf, where)
    kind = cfg.model_type
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act={cfg.hidden_act!r}: kiln converts {kind} with silu experts only")
    llama._refuse_sliding_window(cfg, where)
    if getattr(cfg, "router_jitter_noise", 0.0):
        raise ConfigError(f"{where}: router_jitter_noise={cfg.router_jitter_noise}: kiln's router has no input "
                          f"jitter; set it to 0.0 (it only perturbs training, published Mixtral has 0.0)")
    rope = llama._rope(cfg, where)
    heads = cfg.num_attention_heads
    num_layers = cfg.num_hidden_layers
    if kind == "mixtral":
        expert_ffn, pattern, shared, normalize = cfg.intermediate_size, None, None, True
        qkv_bias = False
    else:
        expert_ffn, normalize = cfg.moe_intermediate_size, bool(cfg.norm_topk_prob)
        step = cfg.decoder_sparse_step
        if not step or step < 1:
            raise ConfigError(f"{where}: decoder_sparse_step={step}: it must be 1 or more")
        pattern = [int(i not in (cfg.mlp_only_layers or []) and (i + 1) % step == 0) for i in range(num_layers)]
        if not any(pattern):
            raise ConfigError(f"{where}: mlp_only_layers / decoder_sparse_step leave no MoE layer; convert it as "
                              f"a dense model (model_type qwen2 or qwen3)")
        pattern = None if all(pattern) else pattern
        shared = cfg.shared_expert_intermediate_size if kind == "qwen2_moe" else None
        if kind == "qwen2_moe" and not shared:
            raise ConfigError(f"{where}: shared_expert_intermediate_size={shared}: Qwen2-MoE's shared expert "
                              f"needs a size of 1 or more")
        qkv_bias = bool(cfg.qkv_bias) if kind == "qwen2_moe" else bool(cfg.attention_bias)
    moe = MoEConfig(
        num_experts=cfg.num_experts, topk=cfg.num_experts_per_tok, ffn_hidden_size=expert_ffn,
        score_function="softmax", normalize_topk=normalize, load_balancing="aux_loss",
        aux_loss_coeff=float(cfg.router_aux_loss_coef), shared_expert_ffn_size=shared,
        shared_expert_gate=shared is not None, layer_pattern=pattern,
    )
    return ModelConfig(
        num_layers=num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=heads, num_query_groups=cfg.num_key_value_heads or heads,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, activation="swiglu",
        position_embedding="rope", rotary_base=rope["base"], rope_scaling=rope["scaling"],
        tie_embeddings=bool(cfg.tie_word_embeddings), add_bias_linear=False, add_qkv_bias=qkv_bias,
        qk_layernorm=kind == "qwen3_moe", init_method_std=cfg.initializer_range, moe=moe,
    )


def model_type_for(m: ModelConfig) -> str:
    """The HF family an MoE ModelConfig exports as; what none of them models is refused."""
    moe = m.moe
    problems = []
    if moe.score_function != "softmax":
        problems.append(f"model.moe.score_function={moe.score_function!r} (HF's MoE families route by softmax)")
    if moe.capacity_factor is not None:
        problems.append("model.moe.capacity_factor is set (HF's MoE families drop no tokens)")
    if moe.shared_expert_ffn_size is not None and not moe.shared_expert_gate:
        problems.append("a shared expert without model.moe.shared_expert_gate (Qwen2-MoE gates it)")
    if moe.shared_expert_gate and moe.shared_expert_ffn_size is None:
        problems.append("model.moe.shared_expert_gate without model.moe.shared_expert_ffn_size")
    if m.activation != "swiglu" or m.normalization != "RMSNorm" or m.position_embedding != "rope":
        problems.append("not a SwiGLU/RMSNorm/RoPE model (model.activation, model.normalization, "
                        "model.position_embedding)")
    if problems:
        raise ConfigError(f"this MoE model has no Hugging Face family kiln writes: {'; '.join(problems)}")
    if m.qk_layernorm:
        kind = "qwen3_moe"
    elif moe.shared_expert_ffn_size is not None:
        kind = "qwen2_moe"
    elif m.add_qkv_bias or moe.layer_pattern is not None or not moe.normalize_topk:
        raise ConfigError("this MoE model has no shared expert and no q/k norm, so it would be Mixtral, which "
                          "has no q/k/v bias (model.add_qkv_bias), no dense layers (model.moe.layer_pattern) and "
                          "always renormalizes its top-k weights (model.moe.normalize_topk)")
    else:
        kind = "mixtral"
    if kind == "qwen3_moe" and moe.shared_expert_ffn_size is not None:
        raise ConfigError("Qwen3-MoE (chosen by model.qk_layernorm) has no shared expert: unset "
                          "model.moe.shared_expert_ffn_size or model.qk_layernorm")
    return kind


def _sparsity(moe: MoEConfig, num_layers: int) -> dict:
    """Qwen's decoder_sparse_step / mlp_only_layers for a layer pattern."""
    pattern = moe.layer_pattern or [1] * num_layers
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, p in enumerate(pattern) if not p]}


def hf_config(m: ModelConfig, model_type: str) -> dict:
    """config.json as the pinned transformers writes it."""
    from transformers import AutoConfig

    moe = m.moe
    if model_type != model_type_for(m):
        raise ConfigError(f"this MoE model is {model_type_for(m)}-shaped, not {model_type}")
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling is not None:
        raise ConfigError("model.rope_scaling is set: HF's MoE families have no Llama 3 RoPE scaling")
    fields = {
        "architectures": [ARCHITECTURES[model_type]],
        "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.heads_kv, "head_dim": m.head_dim,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon, "rope_parameters": rope, "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_method_std, "use_cache": True,
        "num_experts_per_tok": moe.topk, "router_aux_loss_coef": moe.aux_loss_coeff,
    }
    if model_type == "mixtral":
        fields.update(intermediate_size=m.expert_ffn_size, num_local_experts=moe.num_experts, sliding_window=None,
                      router_jitter_noise=0.0)
    else:
        fields.update(intermediate_size=m.ffn_size, moe_intermediate_size=m.expert_ffn_size,
                      num_experts=moe.num_experts, norm_topk_prob=moe.normalize_topk, use_sliding_window=False,
                      **_sparsity(moe, m.num_layers))
    if model_type == "qwen2_moe":
        fields.update(shared_expert_intermediate_size=moe.shared_expert_ffn_size, qkv_bias=m.add_qkv_bias)
    elif model_type == "qwen3_moe":
        fields.update(attention_bias=m.add_qkv_bias)
    config = AutoConfig.for_model(model_type, **fields).to_diff_dict()  # what save_pretrained writes
    return {key: value for key, value in config.items() if key not in ("transformers_version", "dtype", "torch_dtype")}


def _mlp_prefix(model_type: str) -> str:
    return "model.layers.{i}.block_sparse_moe." if model_type == "mixtral" else "model.layers.{i}.mlp."


def params(m: ModelConfig, padded_vocab: int, model_type: str) -> list[Param]:
    """The Llama family's attention and embeddings, then the MoE layers' router, experts (one HF tensor
    set per expert) and shared expert, and the dense layers' MLP."""
    moe = m.moe
    dense_mlp = ("decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight")
    out = [p for p in llama.params(m, padded_vocab) if p.megatron not in (*dense_mlp, DENSE_NORM)]
    layer, mlp = "model.layers.{i}.", _mlp_prefix(model_type)
    moe_layers = tuple(i for i in range(m.num_layers) if moe.is_moe_layer(i))
    dense_layers = tuple(i for i in range(m.num_layers) if not moe.is_moe_layer(i))
    # the norm before the MLP: fused into a dense MLP's fc1 (TE spec; the local spec maps its key there),
    # a module of its own before an MoE layer's router, named as TransformerEngine's spec names it
    out.append(Param(MOE_NORM, [layer + "post_attention_layernorm.weight"], layers=moe_layers))
    if dense_layers:
        out.append(Param(DENSE_NORM, [layer + "post_attention_layernorm.weight"], layers=dense_layers))
    gate, up, down = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    expert = mlp + "experts.{e}."
    out += [
        Param(ROUTER, [mlp + "gate.weight"], layers=moe_layers),
        Param(EXPERT_FC1, [expert + f"{gate}.weight", expert + f"{up}.weight"], GateUp(), layers=moe_layers,
              experts=moe.num_experts),
        Param(EXPERT_FC2, [expert + f"{down}.weight"], layers=moe_layers, experts=moe.num_experts),
    ]
    if moe.shared_expert_ffn_size is not None:
        out += [
            Param(SHARED_FC1, [mlp + "shared_expert.gate_proj.weight", mlp + "shared_expert.up_proj.weight"],
                  GateUp(), layers=moe_layers),
            Param(SHARED_FC2, [mlp + "shared_expert.down_proj.weight"], layers=moe_layers),
            Param(SHARED_GATE, [mlp + "shared_expert_gate.weight"], layers=moe_layers),
        ]
    if dense_layers:
        out += [
            Param(dense_mlp[0], [layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"], GateUp(),
                  layers=dense_layers),
            Param(dense_mlp[1], [layer + "mlp.down_proj.weight"], layers=dense_layers),
        ]
    if m.qk_layernorm:
        out += [Param("decoder.layers.self_attention.q_layernorm.weight", [layer + "self_attn.q_norm.weight"]),
                Param("decoder.layers.self_attention.k_layernorm.weight", [layer + "self_attn.k_norm.weight"])]
    return out


def expert_weights(read, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One routed expert of one layer from any source's global view (`Model.read`): megatron-core's
    linear_fc1 [2 ffn, hidden] ([gate; up]) and linear_fc2 [hidden, ffn]. Only that expert is read."""
    return read(EXPERT_FC1, layer, expert), read(EXPERT_FC2, layer, expert)


_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def module_tensor(model_type: str, reader, name: str) -> torch.Tensor | None:
    """A tensor of transformers' in-memory MoE modules built from the per-expert tensors on disk (one
    layer's experts), or None for a name that is stored as is."""
    if model_type not in MODEL_TYPES:
        return None
    mlp = _mlp_prefix(model_type)
    fused = _FUSED.match(name)
    if fused is None:
        if model_type == "mixtral" and ".mlp." in name and name.startswith("model.layers."):
            return reader.get(name.replace(".mlp.", ".block_sparse_moe.", 1))
        return None
    layer, which = int(fused.group(1)), fused.group(2)
    gate, up, down = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    experts = []
    for e in range(count_experts(reader, mlp.format(i=layer))):
        expert = mlp.format(i=layer) + f"experts.{e}."
        if which == "gate_up_proj":
            experts.append(torch.cat([reader.get(expert + f"{gate}.weight"), reader.get(expert + f"{up}.weight")]))
        else:
            experts.append(reader.get(expert + f"{down}.weight"))
    return torch.stack(experts)


def count_experts(reader, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"experts\.(\d+)\.")
    return len({m.group(1) for n in reader.names() if (m := pattern.match(n))})
