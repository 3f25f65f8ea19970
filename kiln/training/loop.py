"""The training loop every stage that trains shares: resume or load weights, step, check, log,
validate, checkpoint, stop cleanly on preemption. A stage supplies a `Task`: its batches and
its forward step (next-token loss for pretraining and SFT, preference losses for DPO, ...)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kiln import overrides
from kiln.errors import CheckpointError
from kiln.training import checkpoint as ckpt
from kiln.training.engine import eval_step, train_step
from kiln.training.metrics import MetricsLogger, flops_per_token
from kiln.training.moe import MoEMonitor
from kiln.training.preemption import EXIT_PREEMPTED, PreemptionHandler


@dataclass
class ValidSource:
    """One held-out data source of a blend: its name in metric keys and its normalized weight."""

    name: str
    weight: float
    batches: Callable[[int], Iterator[dict]]  # eval batch index -> microbatches


@dataclass
class Task:
    name: str  # the stage, for logs
    batches: Callable[[int], Iterator[dict]]  # step -> this rank's microbatches for that step
    forward_step: Callable  # (batch, model) -> (output, loss_func)
    tokens_per_step: int
    rows_per_sample: int = 1  # sequences per sample: 2 for preference pairs (chosen, rejected)
    report_names: tuple[str, ...] = ("loss",)
    valid_batches: Callable[[int], Iterator[dict]] | None = None  # eval batch index -> microbatches
    # a blend's sources, scored one by one (val_loss/<name>) and as a weighted total (val_loss);
    # when set, valid_batches is unused
    valid_sources: list[ValidSource] = field(default_factory=list)
    tokenizer: str | None = None  # recorded in checkpoints, so conversion finds it
    describe: str = ""
    # model tensors that checkpoint.load_weights cannot hold (new adapters or heads): they keep
    # their initialisation; with adapter_only, checkpoints hold only these (plus the optimizer)
    # and a resume first loads the base weights again
    new_keys: Callable[[str], bool] | None = None
    adapter_only: bool = False
    # other engines trained alongside (a PPO critic): checkpointed with the same step under
    # <checkpoint_dir>/<name>/ just before the main checkpoint, and resumed from that step
    companions: dict = field(default_factory=dict)


class StepRunner:
    """One training step as the loop runs it: data, forward/backward, optimizer, checks,
    validation when due, logs. benchmarks/engine_overhead.py times exactly this against a
    bare megatron-core loop."""

    def __init__(self, cfg, engine, task: Task, metrics: MetricsLogger, device, world: int):
        self.cfg, self.engine, self.task = cfg, engine, task
        self.metrics, self.device, self.world = metrics, device, world
        self.microbatches = cfg.num_microbatches(world)
        vocab = cfg.model.padded_vocab_size(cfg.parallel.tp)
        self.flops = flops_per_token(cfg.model, cfg.train.seq_length, vocab)
        self.validation: dict | None = None  # the latest round: {"step", "val_loss", ...}, for the manifest
        self.moe = MoEMonitor(engine.chunks, cfg.model, device) if cfg.model.moe is not None else None

    def __call__(self, step: int) -> dict:
        t = self.cfg.train
        if self.moe is not None:
            self.moe.reset()
        tic = time.perf_counter()
        result = train_step(self.engine, lambda: self.task.batches(step), self.microbatches, t.seq_length,
                            t.micro_batch_size * self.task.rows_per_sample, self.task.forward_step,
                            self.task.report_names)
        seconds = time.perf_counter() - tic
        self.metrics.check(step + 1, result["loss"], result["grad_norm"])
        record = {**{k: result[k] for k in self.task.report_names}, "lr": result["lr"],
                  "grad_norm": result["grad_norm"], "tokens_per_s": self.task.tokens_per_step / seconds,
                  "s_per_step": seconds, **({"skipped": 1} if "skipped" in result else {})}
        if self.moe is not None:  # aux losses and expert load of this step's forward passes
            record.update(self.moe.collect(self.microbatches))
        if self.device.type == "cuda":
            record["tflops_per_gpu"] = self.flops * self.task.tokens_per_step / seconds / self.world / 1e12
        if t.eval_interval and self.sources and (step + 1) % t.eval_interval == 0:
            record.update(self.validate(step + 1))
        self.metrics.log(step + 1, record)
        return record

    @property
    def sources(self) -> list[ValidSource]:
        if self.task.valid_sources:
            return self.task.valid_sources
        return [ValidSource("", 1.0, self.task.valid_batches)] if self.task.valid_batches else []

    def validate(self, step: int) -> dict[str, float]:
        """val_<report> for every report; with several sources, val_<report>/<source> for each and
        val_<report> = sum of normalized weight x that source's mean (the loss expected under the
        training mixture, each source measured on its own held-out samples)."""
        scores = {s.name: self.evaluate(s.batches) for s in self.sources}
        record = {f"val_{k}": sum(s.weight * scores[s.name][k] for s in self.sources) for k in self.task.report_names}
        if len(self.sources) > 1:
            record.update({f"val_{k}/{name}": v for name, score in scores.items() for k, v in score.items()})
        self.validation = {"step": step, **record}
        return record

    def evaluate(self, valid_batches: Callable[[int], Iterator[dict]]) -> dict[str, float]:
        """Mean reports over eval batches 0..eval_steps-1: every round (step 0, each eval_interval,
        an eval-only run) reads the same held-out samples, so rounds differ only by the model."""
        t = self.cfg.train
        totals: dict[str, float] = {}
        for index in range(t.eval_steps):
            result = eval_step(self.engine, lambda index=index: valid_batches(index), self.microbatches,
                               t.seq_length, t.micro_batch_size * self.task.rows_per_sample, self.task.forward_step,
                               self.task.report_names)
            for key, value in result.items():
                totals[key] = totals.get(key, 0.0) + value / t.eval_steps
        return totals


def save(cfg, engine, step: int, task: Task) -> None:
    # the model config and tokenizer travel with the weights, so conversion needs nothing else
    state = {"consumed_samples": step * cfg.train.global_batch_size, "model": overrides.to_dict(cfg.model),
             "tokenizer": os.path.abspath(task.tokenizer) if task.tokenizer else None}
    for name, companion in task.companions.items():  # first: the main `latest` marker commits the step
        ckpt.save(Path(cfg.checkpoint_dir) / name, step, companion.chunks, companion.optimizer,
                  companion.scheduler, state, cfg.checkpoint.keep_last)
    ckpt.save(cfg.checkpoint_dir, step, engine.chunks, engine.optimizer, engine.scheduler, state,
              cfg.checkpoint.keep_last, skip=_base_keys(task))


def manifest_inputs(cfg, *extra_checkpoints: str | None) -> list[str]:
    """What a fine-tuning run read, for its manifest: its data, its tokenizer and every
    checkpoint it loaded (starting weights, DPO's reference, RLHF's reward model)."""
    d = cfg.data
    files = [d.train, *([d.valid] if d.valid else []), os.path.join(d.tokenizer, "tokenizer.json")]
    return files + ckpt.loaded_checkpoints(cfg.checkpoint.load_weights, *extra_checkpoints)


def _load(cfg, engine, task: Task, weights_only: bool) -> tuple[int, Path | None]:
    """Resume (the newest checkpoint in checkpoint.dir) or load starting weights; returns the
    step to continue from and what was loaded. `weights_only` leaves optimizer and schedule out."""
    if cfg.checkpoint.resume and ckpt.latest(cfg.checkpoint_dir) is not None:
        source = ckpt.latest(cfg.checkpoint_dir)
        if task.adapter_only:
            ckpt.load(cfg.checkpoint.load_weights, engine.chunks, fresh=task.new_keys)
        if weights_only:
            return ckpt.load(source, engine.chunks, fresh=_base_keys(task)).get("step", 0), source
        start_step = ckpt.load(source, engine.chunks, engine.optimizer, engine.scheduler,
                               fresh=_base_keys(task))["step"]
        for name, companion in task.companions.items():
            ckpt.load(Path(cfg.checkpoint_dir) / name / ckpt.name(start_step), companion.chunks,
                      companion.optimizer, companion.scheduler)
        return start_step, source
    if cfg.checkpoint.load_weights:
        source = ckpt.resolve(cfg.checkpoint.load_weights)
        state = ckpt.load(source, engine.chunks, fresh=task.new_keys)
        return (state.get("step", 0) if weights_only else 0), source
    return 0, None


def _base_keys(task: Task):
    return (lambda key: not task.new_keys(key)) if task.adapter_only else None


def train(cfg, engine, task: Task, rank: int, world: int, device) -> dict:
    """Run `task` to cfg.train.steps. Returns {"steps", "final", "checkpoint"}, or {"preempted_at"} /
    {"stopped_at"} when the run ends early on purpose. With train.steps=0 it only scores the loaded
    weights on the validation data: {"eval_only", "steps" (the checkpoint's step), "validation",
    "checkpoint"}; no optimizer step, no checkpoint written."""
    t = cfg.train
    evaluating = t.steps == 0
    start_step, source = _load(cfg, engine, task, weights_only=evaluating)
    if evaluating and source is None:
        raise CheckpointError(f"train.steps=0 scores a checkpoint, but {cfg.checkpoint_dir} holds none and "
                              f"checkpoint.load_weights is unset: set checkpoint.load_weights=<checkpoint or run dir>")
    metrics = MetricsLogger(cfg.run_dir, cfg.logging, t.steps, enabled=rank == 0,
                            resumed=start_step > 0 and not evaluating, config=cfg)
    if rank == 0:
        p = cfg.parallel
        print(f"kiln {task.name}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} | "
              f"TP={p.tp} PP={p.pp}{f' VPP={p.vpp}' if p.vpp else ''} DP={engine.dp_size}"
              f"{' +SP' if p.sequence_parallel else ''} on {world} {device.type} process(es) | "
              f"{cfg.num_microbatches(world)} microbatches/step | {engine.precision}{task.describe}", flush=True)
        if source is not None:
            print(f"loaded {source} at step {start_step}", flush=True)
    runner = StepRunner(cfg, engine, task, metrics, device, world)
    if evaluating:
        try:
            metrics.log(start_step, runner.validate(start_step), echo=True)
        finally:
            metrics.close()
        return {"eval_only": True, "steps": start_step, "validation": runner.validation, "checkpoint": str(source)}
    preemption = PreemptionHandler(t.preempt_signals)
    last: dict = {}
    step = start_step
    try:
        if t.eval_interval and runner.sources and start_step == 0:
            metrics.log(0, runner.validate(0))  # the curve starts from the initial (or loaded) weights
        while step < t.steps:
            last = runner(step)
            step += 1
            if step < t.steps and preemption.should_stop(device):
                save(cfg, engine, step, task)
                if rank == 0:
                    print(f"{preemption.requested or 'a peer rank was signalled'}: saved step {step}, "
                          f"exiting for requeue (exit code {EXIT_PREEMPTED})", flush=True)
                return {"preempted_at": step}
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step < t.steps:
                save(cfg, engine, step, task)
            if t.stop_after_steps is not None and step - start_step >= t.stop_after_steps:
                return {"stopped_at": step}
        if step > start_step or ckpt.latest(cfg.checkpoint_dir) is None:
            save(cfg, engine, step, task)
    finally:
        preemption.restore()
        metrics.close()
    return {"steps": step, "final": last, "checkpoint": str(Path(cfg.checkpoint_dir) / ckpt.name(step)),
            **({"validation": runner.validation} if runner.validation else {})}
