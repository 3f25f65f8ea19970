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
