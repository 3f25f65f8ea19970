"""`kiln pretrain`: the pretraining stage on the megatron-core engine.

Every rank runs `pretrain(cfg)`; rank and world come from torchrun or srun. The
config is resolved and validated before any process group exists.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from kiln.artifact import write_manifest
from kiln.config import PretrainConfig
from kiln.data import gpt_dataset
from kiln.training import loop, trackers
from kiln.training.distributed import (
    destroy_model_parallel,
    init_model_parallel,
    init_process_group,
    process_env,
    require_megatron_core,
)
from kiln.training.engine import build_engine, lm_forward_step
from kiln.training.validate import validate


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """A copy with what can be derived filled in (today: the vocab size from the tokenizer, when
    it exists; validation names a missing one)."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.vocab_size is None and cfg.data.tokenizer and (Path(cfg.data.tokenizer) / "tokenizer.json").exists():
        from kiln.data.tokenizer import vocab_size

        cfg.model.vocab_size = vocab_size(cfg.data.tokenizer)
    return cfg


def _tokenizer(cfg: PretrainConfig):
    if cfg.data.tokenizer:
        from kiln.data.tokenizer import MegatronTokenizer

        return MegatronTokenizer(cfg.data.tokenizer)
    from megatron.core.datasets.utils import Split  # noqa: F401  (mock data needs only sizes)

    class _MockTokenizer:
        vocab_size = cfg.model.vocab_size
        eod = 0
        unique_identifiers = {"class": "kiln.mock", "vocab": cfg.model.vocab_size}

    return _MockTokenizer()


def pretrain(cfg: PretrainConfig) -> dict:
    """Train; returns the summary written to the run's kiln.json (on every rank)."""
    return run_ranks(cfg, _train)


def run_ranks(cfg, body) -> dict:
    """What every training stage's rank does around its `body(cfg, rank, world, device, started,
    request)`: resolve and validate the config, then set up and tear down the process groups."""
    started = time.time()
    penv = process_env()
    request = copy.deepcopy(cfg)
    cfg = resolve(cfg)
    validate(cfg, penv.world_size)
    require_megatron_core()
    if not torch.cuda.is_available():
        from kiln.training import cpu

        cpu.enable()
    device = init_process_group(penv)
    init_model_parallel(cfg.parallel, cfg.train.seed)
    try:
        summary = body(cfg, penv.rank, penv.world_size, device, started, request)
    finally:
        destroy_model_parallel()
    if penv.rank == 0 and "steps" in summary:  # the body wrote kiln.json: its lineage goes to the trackers
        trackers.log_manifest(cfg)
    return summary


def _train(cfg: PretrainConfig, rank: int, world: int, device, started: float,
           request: PretrainConfig) -> dict:
    t = cfg.train
    engine = build_engine(cfg, device)
    train_ds, valid = gpt_dataset.build_datasets(
        cfg.data, t, _tokenizer(cfg), cfg.data.cache_dir or str(Path(cfg.run_dir) / "data_cache")
    )
    task = pretraining_task(cfg, engine, train_ds, valid, world, device)
    summary = loop.train(cfg, engine, task, rank, world, device)
    if rank == 0 and "steps" in summary:
        write_manifest(cfg.run_dir, "pretrain", cfg, _input_files(cfg), summary, started, request=request)
    return summary


def pretraining_task(cfg: PretrainConfig, engine, train_ds, valid: dict, world: int, device) -> loop.Task:
    """`valid`: source name -> valid dataset (gpt_dataset.build_datasets); weighted as in data.blend."""
    t = cfg.train
    order = gpt_dataset.BatchOrder(t.micro_batch_size, t.global_batch_size, engine.dp_rank, engine.dp_size)
    count = cfg.num_microbatches(world)

    def batches(dataset):
        return lambda step: gpt_dataset.microbatches(dataset, order, step, count, device)

    weights = (gpt_dataset.blend(cfg.data)[1] if valid and not cfg.data.mock else None) or [1.0] * len(valid)
    return loop.Task(
        name="pretrain",
        batches=batches(train_ds),
        valid_sources=[loop.ValidSource(name, w / sum(weights), batches(ds))
                       for (name, ds), w in zip(valid.items(), weights, strict=True)],
        forward_step=lm_forward_step,
        tokens_per_step=t.global_batch_size * t.seq_length,
        tokenizer=cfg.data.tokenizer,
    )


def _input_files(cfg: PretrainConfig) -> list[str]:
    files = []
    if not cfg.data.mock:
        prefixes, _ = gpt_dataset.blend(cfg.data)
        files += [p + suffix for p in prefixes for suffix in (".bin", ".idx")]
    if cfg.data.tokenizer:
        files.append(os.path.join(cfg.data.tokenizer, "tokenizer.json"))
    from kiln.training.checkpoint import loaded_checkpoints

    return files + loaded_checkpoints(cfg.checkpoint.load_weights)
