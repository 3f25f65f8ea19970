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


@dataclass
class Recorded:
    """What a kiln checkpoint records, read without a process group."""

    path: Path  # the checkpoint directory (a run directory or checkpoint root resolves to its `latest`)
    model: ModelConfig
    tokenizer: str | None
    step: int
    rows: int | None  # the saved (padded) vocabulary rows

    def model_for(self, tp: int) -> ModelConfig:
        """The model with its vocabulary padded to the saved rows at this TP size (rows are padded for
        the TP it was trained with; any TP dividing them reads them whole: checkpoint.load refuses others)."""
        model = copy.deepcopy(self.model)
        if self.rows and self.rows % tp == 0:
            model.make_vocab_size_divisible_by = self.rows // tp
        return model


def read(source: str | Path) -> Recorded:
    from megatron.core import dist_checkpointing

    path = ckpt.resolve(source)
    state = dist_checkpointing.load_common_state_dict(str(path)).get("kiln", {})
    if "model" not in state:
        raise CheckpointError(f"{path} records no model config (not written by kiln): convert it to HF first "
                              f"(`kiln convert {source} --to hf`) and use that directory")
    embedding = dist_checkpointing.load_tensors_metadata(str(path)).get("embedding.word_embeddings.weight")
    return Recorded(path, overrides.from_dict(ModelConfig, state["model"]), state.get("tokenizer"),
                    state.get("step", 0), embedding.global_shape[0] if embedding is not None else None)


# a config's dtype name -> the engine's precision (None: bf16 on GPU, fp32 on CPU)
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", None: "auto"}


def open_model(source: str | Path, parallel: ParallelConfig, dtype: str | None = None,
               timeout_minutes: int = 30) -> Loaded:
    """Every rank (torchrun / srun, or one process): the checkpoint's model on kiln's engine in the
    `parallel` layout (any TP/PP: dist-checkpointing reshards), frozen, in `dtype` (a config's name:
    float32, bfloat16, float16). `close` tears it down."""
    from kiln.training.distributed import (
        init_model_parallel,
        init_process_group,
        process_env,
        require_megatron_core,
    )
    from kiln.training.model import build_model, resolve_precision

    recorded = read(source)
    require_megatron_core()
    if not torch.cuda.is_available():
        from kiln.training import cpu

        cpu.enable()
    device = init_process_group(process_env(), timeout_minutes)
    parallel = copy.deepcopy(parallel)
    parallel.vpp = None
    init_model_parallel(parallel, seed=0)
    model = recorded.model_for(parallel.tp)
    # frozen: megatron-core's DDP wrapper (which checkpoint.load expects) then keeps no gradient buffers
    chunks, _ = build_model(model, parallel, resolve_precision(PRECISIONS[dtype]), device, False,
                            transform=lambda gpt: gpt.requires_grad_(False))
    ckpt.load(recorded.path, chunks)
    for chunk in chunks:
        chunk.eval()
    return Loaded(chunks, model, recorded.tokenizer, recorded.step, recorded.path, device)


def close() -> None:
    from kiln.training.distributed import destroy_model_parallel

    destroy_model_parallel()
    torch.distributed.destroy_process_group()


@contextmanager
def loaded(source: str | Path, parallel: ParallelConfig, dtype: str | None = None):
    """`open_model` for the block."""
    try:
        yield open_model(source, parallel, dtype)
    finally:
        if torch.distributed.is_initialized():
            close()
