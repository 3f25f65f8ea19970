"""Numerical parity: the source and the converted model on the same tokens, in fp32 on CPU.

The Megatron side is megatron-core's own GPTModel (the model kiln trains), filled from a
checkpoint through its `sharded_state_dict()`, so checkpoint names and layouts are megatron's,
not an assumption of kiln's. The HF side is transformers' model loaded from the directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from kiln.config import ModelConfig, ParallelConfig
from kiln.errors import ParityError

TOLERANCE = 1e-4
# read(key, layer, expert) -> the whole global tensor, one layer of a stacked one, or one expert of one layer
TensorSource = Callable[..., torch.Tensor]


def sample_tokens(vocab: int, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@contextlib.contextmanager
def one_process_engine():
    """megatron-core's model-parallel groups for a one-process forward, released afterwards. Each
    gloo group keeps a polling thread until it is destroyed: a process that converted many
    checkpoints (the test suite) had gathered 1,500 such threads, a hundred of them busy."""
    from kiln.training import cpu, distributed
    from kiln.training.distributed import free_port

    if not torch.cuda.is_available():
        cpu.enable()
    created = not torch.distributed.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)
    distributed.init_model_parallel(ParallelConfig(), seed=0)
    try:
        yield
    finally:
        distributed.destroy_model_parallel()
        if created:
            torch.distributed.destroy_process_group()  # every group this created, with its threads


def megatron_logits(read: TensorSource, m: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from kiln.training.model import build_gpt, transformer_config

    parallel = ParallelConfig()
    with one_process_engine():
        model = build_gpt(m, parallel, transformer_config(m, parallel, "fp32"))
        sharded = model.sharded_state_dict()
        apply_factories(sharded)  # SwiGLU's fc1 becomes its gate and up halves, views of the weight
        with torch.no_grad():
            for sh in nested_values(sharded):
                if isinstance(sh, ShardedTensor):
                    fill(sh, read(*locate(sh)))
            model.eval()
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            logits = model(tokens, positions, None)
        return logits[..., : m.vocab_size].float()


def locate(sh) -> tuple[str, int | None, int | None]:
    """(global-view key, layer, expert) of one of megatron-core's sharded tensors: the layer from the
    stacked axis or, when each layer's tensors are named apart, from the key; a routed expert's global
    id from the axis after it."""
    from kiln.conversion.megatron import global_key

    key, layer = global_key(sh.key)
    axes = list(sh.global_offset[: sh.prepend_axis_num])
    if layer is None and key.startswith("decoder.layers.") and axes:
        layer = axes.pop(0)
    return key, layer, axes[0] if axes else None


def fill(sh, full: torch.Tensor) -> None:
    """A sharded tensor's region of `full` (the global tensor, or one layer's (one expert's) of a stacked key)."""
    region = full
    for dim, (start, size) in enumerate(zip(sh.global_offset[sh.prepend_axis_num:], sh.local_shape, strict=True)):
        region = region.narrow(dim, start, size)
    sh.data.copy_(region.to(sh.data.dtype))


def compare(reference: torch.Tensor, candidate: torch.Tensor, what: str) -> float:
    if reference.shape != candidate.shape:
        raise ParityError(f"{what}: logits shapes differ, {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    delta = (reference - candidate).abs().max().item()
    if not delta <= TOLERANCE:
        raise ParityError(f"{what}: max |delta logit| = {delta:.3e} exceeds {TOLERANCE:.0e}; the conversion changed "
                          f"the model, and its output was not kept")
    print(f"parity: {what}: max |delta logit| = {delta:.2e} <= {TOLERANCE:.0e} (fp32, {tuple(reference.shape)})",
          flush=True)
    return delta
