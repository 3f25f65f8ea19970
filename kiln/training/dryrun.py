"""`--dryrun`: the resolved config, the derived parallel layout and a memory estimate per rank."""

from __future__ import annotations

import yaml

from kiln import overrides
from kiln.config import PretrainConfig
from kiln.training import memory
from kiln.training.layers import transformer_engine_available
from kiln.training.model import resolve_precision


def layout(cfg: PretrainConfig, world_size: int) -> dict:
    p, t = cfg.parallel, cfg.train
    microbatches = cfg.num_microbatches(world_size)
    experts = {}
    if cfg.model.moe is not None:  # the expert layers' own split of each stage's ranks
        etp = p.etp or p.tp
        experts = {"ep": p.ep, "expert_tp": etp, "expert_dp": world_size // (p.pp * p.ep * etp),
                   "experts_per_ep_rank": cfg.model.moe.num_experts // p.ep, "moe_dispatcher": p.moe_dispatcher}
    return {
        "world_size": world_size,
        "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "dp": p.dp(world_size), **experts,
        "sequence_parallel": p.sequence_parallel,
        "layers_per_pipeline_stage": cfg.model.num_layers // p.pp,
        "microbatches_per_step": microbatches,
        "tokens_per_step": t.global_batch_size * t.seq_length,
        "padded_vocab_size": cfg.model.padded_vocab_size(p.tp),
        "precision": resolve_precision(t.precision),
    }


def describe(cfg: PretrainConfig, world_size: int) -> str:
    """For a config the launcher has validated."""
    import torch

    derived = layout(cfg, world_size)
    # plan for the target: bf16/fp16 runs are GPU runs with TransformerEngine's fused attention
    fused = derived["precision"] != "fp32" or (torch.cuda.is_available() and transformer_engine_available())
    mem = memory.estimate(cfg, world_size, derived["precision"], flash_attention=fused)
    lines = ["# resolved config", yaml.safe_dump(overrides.to_dict(cfg), sort_keys=False).rstrip(),
             "", "# layout"]
    lines += [f"{k}: {v}" for k, v in derived.items()]
    lines += ["", "# memory per rank (estimate, busiest pipeline stage)",
              f"parameters: {mem['parameters_total'] / 1e9:.3f} B total, "
              f"{mem['parameters_per_rank'] / 1e9:.3f} B on this rank"]
    if cfg.model.moe is not None:
        lines.append(f"experts: {mem['parameters_active'] / 1e9:.3f} B active per token; "
                     f"{mem['expert_parameters_per_rank'] / 1e9:.3f} B of this rank's are expert weights")
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        lines.append(f"{key + ':':<13}{mem[key + '_gib']:9.2f} GiB")
    lines.append("nothing was started (--dryrun)")
    return "\n".join(lines)
