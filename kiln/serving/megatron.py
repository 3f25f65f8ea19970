"""The megatron-core backend: a kiln checkpoint on kiln's own engine, TP x PP ranks together.

Every rank builds its shard of the model, loads the checkpoint (resharded to this layout) and
runs each job with kiln.training.generate: KV-cached generation and prompt scoring that give the
same tokens whatever the TP/PP layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln import overrides
from kiln.config import GenerationConfig, ModelConfig, ServeConfig
from kiln.data import tokenizer as tokenizers
from kiln.errors import ConfigError
from kiln.training import checkpoint as ckpt
from kiln.training import generate

PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", None: "auto"}
# followers wait in a broadcast for the next request, however long the server idles; a rank that
# dies still ends the others (torchrun stops the whole group)
IDLE_TIMEOUT_MINUTES = 60 * 24 * 365


@dataclass
class CheckpointInfo:
    path: Path
    model: ModelConfig  # with its vocabulary padding matched to the saved rows
    tokenizer: str | None
    rows: int  # the saved (padded) vocabulary rows


def read_checkpoint(source: str) -> CheckpointInfo:
    """A checkpoint's model config, tokenizer and vocabulary rows, read without a process group."""
    from kiln.conversion.megatron import open_checkpoint

    reader, common = open_checkpoint(source)
    state = common.get("kiln", {})
    if "model" not in state:
        raise ConfigError(f"{reader.path} records no model config (not written by kiln): serve it via "
                         f"`kiln convert --to hf` and the HF directory instead")
    return CheckpointInfo(reader.path, overrides.from_dict(ModelConfig, state["model"]), state.get("tokenizer"),
                          reader.shape("embedding.word_embeddings.weight")[0])


def match_vocab_rows(model: ModelConfig, rows: int, tp: int) -> None:
    """Pad the vocabulary to exactly the saved rows at this TP (checkpoint.load refuses others)."""
    if model.padded_vocab_size(tp) != rows and rows % tp == 0:
        model.make_vocab_size_divisible_by = rows // tp


class MegatronBackend:
    def __init__(self, cfg: ServeConfig, info: CheckpointInfo):
        from kiln.training import cpu
        from kiln.training.distributed import (
            free_port,
            init_model_parallel,
            init_process_group,
            process_env,
            require_megatron_core,
        )
        from kiln.training.model import build_model, resolve_precision

        self.tokenizer = tokenizers.load(cfg.tokenizer or info.tokenizer)
        self.positions, self.vocab_size = info.model.max_position_embeddings, info.model.vocab_size
        self.stop_ids = {tokenizers.eod_id(self.tokenizer)}
        penv = process_env()
        if penv.world_size == 1 and "MASTER_PORT" not in os.environ:  # alone: never meet another job's 29500
            penv = dataclasses.replace(penv, master_port=free_port())
        require_megatron_core()
        if not torch.cuda.is_available():
            cpu.enable()
        device = init_process_group(penv, timeout_minutes=IDLE_TIMEOUT_MINUTES)
        init_model_parallel(cfg.parallel, seed=0)
        match_vocab_rows(info.model, info.rows, cfg.parallel.tp)
        # frozen: megatron-core's DDP wrapper (which checkpoint.load expects) then keeps no gradient buffers
        chunks, _ = build_model(info.model, cfg.parallel, resolve_precision(PRECISIONS[cfg.dtype]), device, False,
                                transform=lambda gpt: gpt.requires_grad_(False))
        ckpt.load(info.path, chunks)
        self.model = chunks[0].eval()

    def stream(self, prompt: list[int], gen: GenerationConfig, seed: int) -> Iterator[int]:
        steps = generate.stream(self.model, prompt, 1, gen, self.stop_ids, self.vocab_size, seed)
        with contextlib.closing(steps):
            for nxt in steps:
                yield int(nxt[0])

    def logprobs(self, tokens: list[int], top: int):
        return generate.token_logprobs(self.model, tokens, self.vocab_size, max(top, 1))

    def close(self) -> None:
        from kiln.training.distributed import destroy_model_parallel

        destroy_model_parallel()
        torch.distributed.destroy_process_group()
