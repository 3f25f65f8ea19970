"""Layer pieces kiln adds to megatron-core's local (non-TransformerEngine) spec."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """TransformerEngine imports only where a CUDA driver is present; anything else means no."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


class SequenceParallelTorchNorm:
    """torch LayerNorm / RMSNorm usable under sequence parallelism.

    With sequence parallelism each TP rank normalises its own slice of the sequence, so the
    norm's weight gradients are partial sums; megatron-core's finalize_model_grads all-reduces
    them across TP for parameters tagged `sequence_parallel`. megatron-core's WrappedTorchNorm
    asserts instead (megatron/core/transformer/torch_norm.py), so the local spec uses this.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


@functools.lru_cache(maxsize=1)
def seeded_experts() -> type:
    """megatron-core's SequentialMLP whose experts are initialised alike on every EP layout.

    The local spec initialises weights on the host from torch's one random stream, so rank 1 of
    EP=2 would draw its first expert (global id 2) where a single process draws expert 0, and
    every layer after it would start from a different point of the stream too. Here each expert
    draws from its own seed (this layer's base seed + its global id), in a forked stream, and the
    layer takes exactly one number from the shared stream, whatever the number of local experts:
    any EP (and expert-TP, which slices the same full weights) starts from the single process's
    weights, and dense layers and DP replicas stay identical."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.utils import get_pg_rank

    class SeededExperts(SequentialMLP):
        def __init__(self, num_local_experts, config, submodules, pg_collection=None):
            base = int(torch.randint(2**62, (1,)))
            super().__init__(0, config, submodules, pg_collection)
            first = get_pg_rank(pg_collection.ep) * num_local_experts
            for expert in range(first, first + num_local_experts):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(base + expert)
                    self.local_experts.append(MLP(self.config, submodules, is_expert=True,
                                                  ffn_hidden_size=self.config.moe_ffn_hidden_size,
                                                  tp_group=pg_collection.expt_tp))
            self.num_local_experts = num_local_experts

    return SeededExperts
