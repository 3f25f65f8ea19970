"""Mixture-of-experts layers in a TensorRT-LLM checkpoint: TP and EP splits of the experts.

What TensorRT-LLM 1.0 expects (source read, not run: tensorrt_llm is GPU-image-only):
- tensorrt_llm/mapping.py, class Mapping: `tp_size == moe_tp_size * moe_ep_size` (moe_cluster_size
  1), else ValueError; for a TP rank, `moe_tp_rank = tp_rank // moe_ep_size` and
  `moe_ep_rank = tp_rank % moe_ep_size`; `ep_experts()` gives EP rank r the contiguous experts
  [r * E/ep, (r + 1) * E/ep).
- tensorrt_llm/layers/moe.py, class MixtureOfExperts: `router` is a RowLinear(hidden, E) in float32
  (strict_dtype), unsplit on every rank; `fc.weight` is [E/ep, 2 * I/moe_tp, hidden] and
  `proj.weight` [E/ep, hidden, I/moe_tp]; with a gated activation ("swiglu") fc's first half is the
  linear projection (HF w3, up) and its second half the activated gate (HF w1) - the reverse of
  GatedMLP's fc/gate naming. The experts' output is all-reduced over the whole TP group. Routing:
  RENORMALIZE (1) is softmax over the top-k router logits (= Mixtral's softmax, top-k,
  renormalise); NONE (0) is top-k of the softmax over all experts.
- tensorrt_llm/models/llama/convert.py, load_weights_from_hf_model: per layer, the EP rank's
  experts are stacked, w1/w3 split on dim 1 and w2 on dim 2 for moe_tp, fc = cat([w3, w1], dim=-2),
  and block_sparse_moe.gate is written as mlp.router.weight in float32.
- tensorrt_llm/models/llama/config.py, LLaMAConfig.from_hugging_face: for model_type mixtral,
  hidden_act becomes "swiglu" and moe.normalization_mode RENORMALIZE; intermediate_size is each
  expert's; `moe` is serialised as MoeConfig's fields (MoeConfig.from_dict is `cls(**dict)`).
- tensorrt_llm/models/__init__.py, MODEL_MAP: MixtralForCausalLM -> LLaMAForCausalLM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kiln.config import ModelConfig
from kiln.errors import ConfigError

RENORMALIZE, NONE = 1, 0  # MoeConfig.ExpertScaleNormalizationMode
# one expert's HF-oriented weights: gate [I, H] (w1), up [I, H] (w3), down [H, I] (w2)
Expert = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def moe_ranks(tp_rank: int, ep: int) -> tuple[int, int]:
    """(moe_tp_rank, moe_ep_rank) of a TP rank, as TensorRT-LLM's Mapping computes them."""
    return tp_rank // ep, tp_rank % ep


def rank_experts(num_experts: int, ep: int, ep_rank: int) -> range:
    per = num_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def rank_moe(router: torch.Tensor, expert: Expert, num_experts: int, tp: int, ep: int, tp_rank: int,
             prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One TP rank's MoE tensors of one layer: the whole router in float32, its EP slice of the
    experts, each cut to its moe-TP slice of the intermediate features."""
    moe_tp = tp // ep
    moe_tp_rank, ep_rank = moe_ranks(tp_rank, ep)
    fc, proj = [], []
    for e in rank_experts(num_experts, ep, ep_rank):
        gate, up, down = expert(e)
        fc.append(torch.cat([up.chunk(moe_tp, dim=0)[moe_tp_rank], gate.chunk(moe_tp, dim=0)[moe_tp_rank]]))
        proj.append(down.chunk(moe_tp, dim=1)[moe_tp_rank])
    return {f"{prefix}mlp.router.weight": router.to(torch.float32).contiguous(),
            f"{prefix}mlp.fc.weight": torch.stack(fc).to(dtype).contiguous(),
            f"{prefix}mlp.proj.weight": torch.stack(proj).to(dtype).contiguous()}


def mixtral_layer(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Expert]:
    """Router and experts from one layer's HF Mixtral tensors (names below `model.layers.{i}.`)."""
    moe = "block_sparse_moe."
    return t[moe + "gate.weight"], lambda e: tuple(t[f"{moe}experts.{e}.w{n}.weight"] for n in (1, 3, 2))


def moe_config(m: ModelConfig) -> dict:
    """config.json's `moe`, only fields every TensorRT-LLM 1.x MoeConfig has (unknown keys fail)."""
    return {"num_experts": m.moe.num_experts, "top_k": m.moe.topk,
            "normalization_mode": RENORMALIZE if m.moe.normalize_topk else NONE}


def check_moe(m: ModelConfig, tp: int, ep: int, model_type: str) -> None:
    """What TensorRT-LLM's Llama-family MoE cannot build, refused before anything is written."""
    if m.moe is None:
        if ep > 1:
            raise ConfigError(f"--ep {ep}: the model has no experts; expert parallelism needs a mixture of "
                              f"experts (leave ep=1)")
        return
    moe = m.moe
    if model_type != "mixtral":
        raise ConfigError(f"model_type {model_type}: kiln exports mixtures of experts to TensorRT-LLM for Mixtral "
                          f"only (Qwen-MoE's shared expert is not written); use --to hf for TensorRT-LLM's LLM API")
    if tp % ep:
        raise ConfigError(f"--ep {ep} does not divide --tp {tp}: TensorRT-LLM splits each TP group into "
                          f"moe_ep_size x moe_tp_size (tp = ep x moe_tp); choose ep among the divisors of tp")
    if moe.num_experts % ep:
        raise ConfigError(f"--ep {ep} does not divide the {moe.num_experts} experts; every EP rank holds "
                          f"num_experts / ep of them")
    if m.expert_ffn_size % (tp // ep):
        raise ConfigError(f"--tp {tp} / --ep {ep} = moe_tp {tp // ep} does not divide each expert's "
                          f"{m.expert_ffn_size} intermediate features; raise ep or lower tp")
    unsupported = []
    if moe.score_function != "softmax":
        unsupported.append(f"score_function={moe.score_function} (TensorRT-LLM's Llama MoE routes by softmax)")
    if moe.shared_expert_ffn_size is not None:
        unsupported.append("a shared expert (Llama's MoE layer has none)")
    if moe.layer_pattern is not None and not all(moe.layer_pattern):
        unsupported.append("dense layers between MoE layers (every TensorRT-LLM Llama layer is MoE)")
    if unsupported:
        raise ConfigError(f"model.moe: {'; '.join(unsupported)}: the engine would compute another model; "
                          f"use --to hf for TensorRT-LLM's LLM API")
