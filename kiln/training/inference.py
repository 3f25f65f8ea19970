"""A kiln checkpoint on kiln's engine for inference (evaluation, serving): process groups for a
TP/PP layout, the model it records, its weights resharded to that layout. No optimizer."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln import overrides
from kiln.config import ModelConfig, ParallelConfig
from kiln.errors import CheckpointError
from kiln.training import checkpoint as ckpt


@dataclass
class Loaded:
    chunks: list  # this rank's model chunks (one: inference runs without virtual pipeline stages)
    model: ModelConfig
    tokenizer: str | None  # the tokenizer directory the checkpoint records
    step: int
    path: Path
    device: torch.device

    @property
    def first(self):
        return self.chunks[0]


def recorded_state(source: str | Path) -> tuple[Path, dict]:
    """(checkpoint directory, the kiln state it recorded: step, model config, tokenizer), without a
    process group. A run directory or checkpoint root resolves to its `latest`."""
    from megatron.core import dist_checkpointing

    path = ckpt.resolve(source)
    state = dist_checkpointing.load_common_state_dict(str(path)).get("kiln", {})
    if "model" not in state:
        raise CheckpointError(f"{path} records no model config (not written by kiln): convert it to HF first "
                              f"(`kiln convert {source} --to hf`) and evaluate or serve that")
    return path, state


def model_config(path: Path, state: dict, tp: int) -> ModelConfig:
    """The recorded model, its vocabulary padded to the saved rows at this TP size (the rows
    are padded for the TP it was trained with; any TP dividing them reads them whole)."""
    from megatron.core import dist_checkpointing

    model = overrides.from_dict(ModelConfig, state["model"])
    saved = dist_checkpointing.load_tensors_metadata(str(path)).get("embedding.word_embeddings.weight")
    if saved is not None and saved.global_shape[0] % tp == 0:
        model.make_vocab_size_divisible_by = saved.global_shape[0] // tp
    return model


@contextmanager
def loaded(source: str | Path, parallel: ParallelConfig, precision: str = "fp32", seed: int = 1234):
    """Every rank (torchrun / srun, or one process): the checkpoint's model on kiln's engine in the
    `parallel` layout (any TP/PP: dist-checkpointing reshards), process groups torn down at exit."""
    from kiln.training.distributed import (
        destroy_model_parallel,
        init_model_parallel,
        init_process_group,
        process_env,
        require_megatron_core,
    )
    from kiln.training.model import build_model, resolve_precision

    path, state = recorded_state(source)
    require_megatron_core()
    if not torch.cuda.is_available():
        from kiln.training import cpu

        cpu.enable()
    device = init_process_group(process_env())
    parallel = copy.deepcopy(parallel)
    parallel.vpp = None
    init_model_parallel(parallel, seed)
    try:
        model = model_config(path, state, parallel.tp)
        chunks, _ = build_model(model, parallel, resolve_precision(precision), device, False)
        ckpt.load(path, chunks)
        for chunk in chunks:
            chunk.eval()
        yield Loaded(chunks, model, state.get("tokenizer"), state.get("step", 0), path, device)
    finally:
        destroy_model_parallel()
