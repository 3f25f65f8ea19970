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

from kiln import overrides
from kiln.artifact import write_manifest
from kiln.config import ConfigError, PretrainConfig
from kiln.data import gpt_dataset
from kiln.training import checkpoint as ckpt
from kiln.training.distributed import (
    destroy_model_parallel,
    init_model_parallel,
    init_process_group,
    process_env,
)
from kiln.training.engine import build_engine, eval_step, lm_forward_step, train_step
from kiln.training.metrics import MetricsLogger, flops_per_token
from kiln.training.preemption import EXIT_PREEMPTED, PreemptionHandler
from kiln.training.validate import validate


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """A copy with what can be derived filled in (today: the vocab size from the tokenizer)."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.vocab_size is None and cfg.data.tokenizer:
        from kiln.data.tokenizer import vocab_size

        if not (Path(cfg.data.tokenizer) / "tokenizer.json").exists():
            raise ConfigError(
                f"data.tokenizer={cfg.data.tokenizer} holds no tokenizer.json: run `kiln prepare` first "
                f"(for the tiny recipe: `make demo`, or kiln prepare --input data/demo/corpus.jsonl "
                f"--output runs/demo/data), or point data.tokenizer at a tokenizer directory"
            )
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
    started = time.time()
    penv = process_env()
    request = copy.deepcopy(cfg)
    cfg = resolve(cfg)
    validate(cfg, penv.world_size)
    if not torch.cuda.is_available():
        from kiln.training import cpu

        cpu.enable()
    device = init_process_group(penv)
    init_model_parallel(cfg.parallel, cfg.train.seed)
    try:
        return _train(cfg, penv.rank, penv.world_size, device, started, request)
    finally:
        destroy_model_parallel()


def _train(cfg: PretrainConfig, rank: int, world: int, device, started: float,
           request: PretrainConfig) -> dict:
    t = cfg.train
    engine = build_engine(cfg, device)
    run_dir = Path(cfg.run_dir)
    train_ds, valid_ds = gpt_dataset.build_datasets(
        cfg.data, t, _tokenizer(cfg), cfg.data.cache_dir or str(run_dir / "data_cache")
    )
    order = gpt_dataset.BatchOrder(t.micro_batch_size, t.global_batch_size, engine.dp_rank, engine.dp_size)

    start_step, source = 0, None
    if cfg.checkpoint.resume and ckpt.latest(cfg.checkpoint_dir) is not None:
        source = ckpt.latest(cfg.checkpoint_dir)
        state = ckpt.load(source, engine.chunks, engine.optimizer, engine.scheduler)
        start_step = state["step"]
    elif cfg.checkpoint.load_weights:
        source = ckpt.resolve(cfg.checkpoint.load_weights)
        ckpt.load(source, engine.chunks)

    metrics = MetricsLogger(str(run_dir), cfg.logging, t.steps, enabled=rank == 0, resumed=start_step > 0)
    if rank == 0:
        p = cfg.parallel
        print(f"kiln pretrain: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} | "
              f"TP={p.tp} PP={p.pp}{f' VPP={p.vpp}' if p.vpp else ''} DP={engine.dp_size}"
              f"{' +SP' if p.sequence_parallel else ''} on {world} {device.type} process(es) | "
              f"{cfg.num_microbatches(world)} microbatches/step | {engine.precision}", flush=True)
        if source is not None:
            print(f"loaded {source} at step {start_step}", flush=True)
    step_fn = StepRunner(cfg, engine, train_ds, valid_ds, order, metrics, device, world)
    preemption = PreemptionHandler(t.preempt_signals)
    last: dict = {}
    step = start_step
    try:
        while step < t.steps:
            last = step_fn(step)
            step += 1
            if step < t.steps and preemption.should_stop(device):
                _save(cfg, engine, step)
                if rank == 0:
                    print(f"{preemption.requested or 'a peer rank was signalled'}: saved step {step}, "
                          f"exiting for requeue (exit code {EXIT_PREEMPTED})", flush=True)
                return {"preempted_at": step}
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step < t.steps:
                _save(cfg, engine, step)
            if t.stop_after_steps is not None and step - start_step >= t.stop_after_steps:
                return {"stopped_at": step}
        if step > start_step or ckpt.latest(cfg.checkpoint_dir) is None:
            _save(cfg, engine, step)
    finally:
        preemption.restore()
        metrics.close()
    summary = {"steps": step, "final": last, "checkpoint": str(Path(cfg.checkpoint_dir) / ckpt.name(step))}
    if rank == 0:
        write_manifest(run_dir, "pretrain", cfg, _input_files(cfg), summary, started, request=request)
    return summary


class StepRunner:
    """One training step as the loop runs it: data, forward/backward, optimizer, checks,
    validation when due, logs. benchmarks/engine_overhead.py times exactly this against a
    bare megatron-core loop."""

    def __init__(self, cfg: PretrainConfig, engine, dataset, valid_dataset, order, metrics, device,
                 world: int):
        self.cfg, self.engine, self.dataset, self.order = cfg, engine, dataset, order
        self.valid_dataset = valid_dataset
        self.metrics, self.device, self.world = metrics, device, world
        self.microbatches = cfg.num_microbatches(world)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        vocab = cfg.model.padded_vocab_size(cfg.parallel.tp)
        self.flops = flops_per_token(cfg.model, cfg.train.seq_length, vocab)

    def __call__(self, step: int) -> dict:
        t = self.cfg.train
        tic = time.perf_counter()
        result = train_step(
            self.engine,
            lambda: gpt_dataset.microbatches(self.dataset, self.order, step, self.microbatches, self.device),
            self.microbatches, t.seq_length, t.micro_batch_size, lm_forward_step,
        )
        seconds = time.perf_counter() - tic
        self.metrics.check(step + 1, result["loss"], result["grad_norm"])
        record = {"loss": result["loss"], "lr": result["lr"], "grad_norm": result["grad_norm"],
                  "tokens_per_s": self.tokens_per_step / seconds, "s_per_step": seconds}
        if self.device.type == "cuda":
            record["tflops_per_gpu"] = self.flops * self.tokens_per_step / seconds / self.world / 1e12
        if t.eval_interval and (step + 1) % t.eval_interval == 0:
            record["val_loss"] = self.evaluate((step + 1) // t.eval_interval)
        self.metrics.log(step + 1, record)
        return record

    def evaluate(self, round_index: int) -> float:
        """Mean validation loss over eval_steps global batches; each round reads new samples."""
        t = self.cfg.train
        losses = []
        for i in range(t.eval_steps):
            index = (round_index - 1) * t.eval_steps + i
            result = eval_step(
                self.engine,
                lambda index=index: gpt_dataset.microbatches(
                    self.valid_dataset, self.order, index, self.microbatches, self.device),
                self.microbatches, t.seq_length, t.micro_batch_size, lm_forward_step,
            )
            losses.append(result["loss"])
        return sum(losses) / len(losses)


def _save(cfg: PretrainConfig, engine, step: int) -> None:
    # the model config and tokenizer travel with the weights, so conversion needs nothing else
    state = {"consumed_samples": step * cfg.train.global_batch_size, "model": overrides.to_dict(cfg.model),
             "tokenizer": os.path.abspath(cfg.data.tokenizer) if cfg.data.tokenizer else None}
    ckpt.save(cfg.checkpoint_dir, step, engine.chunks, engine.optimizer, engine.scheduler, state,
              cfg.checkpoint.keep_last)


def _input_files(cfg: PretrainConfig) -> list[str]:
    files = []
    if not cfg.data.mock:
        prefixes, _ = gpt_dataset.blend(cfg.data)
        files += [p + suffix for p in prefixes for suffix in (".bin", ".idx")]
    if cfg.data.tokenizer:
        files.append(os.path.join(cfg.data.tokenizer, "tokenizer.json"))
    return files
