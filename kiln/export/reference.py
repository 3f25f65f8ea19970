"""A CPU forward pass of a TensorRT-LLM checkpoint that reads nothing but its rank shards.

It computes what the engine would: each TP rank works on its own shard, partial results of
attention.dense and mlp.proj are summed where TensorRT-LLM all-reduces, lm_head slices are
gathered, and stages run in order. An MoE layer (config `moe`) routes with each rank's float32
router as TensorRT-LLM's MixtureOfExperts does (RENORMALIZE: softmax over the top-k logits;
NONE: top-k of the softmax), runs the rank's experts (its EP slice, its moe-TP slice of each
expert's features; fc = [up; gate]) and sums over the TP group, the MoE all-reduce. RoPE (with
Llama 3.1 scaling) is computed here from the config alone. Agreement with the source model's
logits checks names, splits, the KV-head duplication and the expert placement of the export
without a GPU; it is an independent implementation, not transformers'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def _inv_freq(cfg: dict) -> torch.Tensor:
    d = cfg["head_size"]
    inv = 1.0 / cfg["rotary_base"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = cfg.get("rotary_scaling")
    if s:
        low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
        medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = torch.where(medium, (1 - smooth) * inv / s["factor"] + smooth * inv, scaled)
    return inv


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _experts(h: torch.Tensor, w: dict, p: str, cfg: dict, tp_rank: int) -> torch.Tensor:
    """One TP rank's share of an MoE layer: its experts' outputs, weighted by the routing."""
    moe, ep = cfg["moe"], cfg["mapping"].get("moe_ep_size", 1)
    logits = h.float() @ w[p + "mlp.router.weight"].float().T
    if moe["normalization_mode"] == 1:  # RENORMALIZE
        top, chosen = logits.topk(moe["top_k"], dim=-1)
        scales = top.softmax(-1)
    elif moe["normalization_mode"] == 0:  # NONE
        scales, chosen = logits.softmax(-1).topk(moe["top_k"], dim=-1)
    else:
        raise ValueError(f"moe.normalization_mode {moe['normalization_mode']} is not one kiln writes (0, 1)")
    weight = torch.zeros_like(logits).scatter(-1, chosen, scales)  # [..., experts], zero where not chosen
    fc, proj = w[p + "mlp.fc.weight"].float(), w[p + "mlp.proj.weight"].float()
    first = (tp_rank % ep) * fc.shape[0]  # moe_ep_rank's contiguous experts
    out = 0
    for i in range(fc.shape[0]):
        up, gate = fc[i].chunk(2)  # the linear half first, the activated half second
        y = (F.silu(h @ gate.T) * (h @ up.T)) @ proj[i].T
        out = out + weight[..., first + i, None] * y
    return out


def trtllm_logits(directory: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    shards = [[load_file(str(directory / f"rank{s * tp + r}.safetensors")) for r in range(tp)] for s in range(pp)]
    d, eps = cfg["head_size"], cfg["norm_epsilon"]
    heads = cfg["num_attention_heads"] // tp
    kv = max(cfg["num_key_value_heads"], tp) // tp  # after the export repeated KV heads for TP
    seq = tokens.shape[1]
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), _inv_freq(cfg))
    cos = torch.cat([angles.cos(), angles.cos()], -1).float()
    sin = torch.cat([angles.sin(), angles.sin()], -1).float()
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    x = shards[0][0]["transformer.vocab_embedding.weight"].float()[tokens]
    for stage in shards:
        layers = len({k.split(".")[2] for k in stage[0] if k.startswith("transformer.layers.")})
        for i in range(layers):
            p = f"transformer.layers.{i}."
            h = _rms_norm(x, stage[0][p + "input_layernorm.weight"].float(), eps)
            attn = 0
            for w in stage:  # every TP rank on its own heads; the sum is TensorRT-LLM's all-reduce
                qkv = h @ w[p + "attention.qkv.weight"].float().T
                if p + "attention.qkv.bias" in w:
                    qkv = qkv + w[p + "attention.qkv.bias"].float()
                q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
                q = _rope(q.unflatten(-1, (heads, d)).transpose(1, 2), cos, sin)
                k = _rope(k.unflatten(-1, (kv, d)).transpose(1, 2), cos, sin)
                v = v.unflatten(-1, (kv, d)).transpose(1, 2)
                k, v = (t.repeat_interleave(heads // kv, dim=1) for t in (k, v))
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
                weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                out = (weights @ v).transpose(1, 2).flatten(-2)
                attn = attn + out @ w[p + "attention.dense.weight"].float().T
            x = x + attn
            h = _rms_norm(x, stage[0][p + "post_layernorm.weight"].float(), eps)
            mlp = 0
            for rank, w in enumerate(stage):
                if p + "mlp.router.weight" in w:
                    mlp = mlp + _experts(h, w, p, cfg, rank)
                    continue
                gated = F.silu(h @ w[p + "mlp.fc.weight"].float().T) * (h @ w[p + "mlp.gate.weight"].float().T)
                mlp = mlp + gated @ w[p + "mlp.proj.weight"].float().T
            x = x + mlp
    last = shards[-1]
    x = _rms_norm(x, last[0]["transformer.ln_f.weight"].float(), eps)
    logits = torch.cat([x @ w["lm_head.weight"].float().T for w in last], dim=-1)  # the TP gather
    return logits[..., : cfg["vocab_size"]]
