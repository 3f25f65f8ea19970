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
from kiln.training import checkpoint as ckpt
from kiln.training.engine import eval_step, train_step
from kiln.training.metrics import MetricsLogger, flops_per_token
from kiln.training.preemption import EXIT_PREEMPTED, PreemptionHandler


@dataclass
class Task:
    name: str  # the stage, for logs
    batches: Callable[[int], Iterator[dict]]  # step -> this rank's microbatches for that step
    forward_step: Callable  # (batch, model) -> (output, loss_func)
    tokens_per_step: int
    rows_per_sample: int = 1  # sequences per sample: 2 for preference pairs (chosen, rejected)
    report_names: tuple[str, ...] = ("loss",)
    valid_batches: Callable[[int], Iterator[dict]] | None = None  # eval batch index -> microbatches
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

    def __call__(self, step: int) -> dict:
        t = self.cfg.train
        tic = time.perf_counter()
        result = train_step(self.engine, lambda: self.task.batches(step), self.microbatches, t.seq_length,
                            t.micro_batch_size * self.task.rows_per_sample, self.task.forward_step,
                            self.task.report_names)
        seconds = time.perf_counter() - tic
        self.metrics.check(step + 1, result["loss"], result["grad_norm"])
        record = {**{k: result[k] for k in self.task.report_names}, "lr": result["lr"],
                  "grad_norm": result["grad_norm"], "tokens_per_s": self.task.tokens_per_step / seconds,
                  "s_per_step": seconds, **({"skipped": 1} if "skipped" in result else {})}
        if self.device.type == "cuda":
            record["tflops_per_gpu"] = self.flops * self.task.tokens_per_step / seconds / self.world / 1e12
        if t.eval_interval and self.task.valid_batches and (step + 1) % t.eval_interval == 0:
            record.update({f"val_{k}": v for k, v in self.evaluate((step + 1) // t.eval_interval).items()})
        self.metrics.log(step + 1, record)
        return record

    def evaluate(self, round_index: int) -> dict[str, float]:
        """Mean validation reports over eval_steps global batches; each round reads new samples."""
        t = self.cfg.train
        totals: dict[str, float] = {}
        for i in range(t.eval_steps):
            index = (round_index - 1) * t.eval_steps + i
            result = eval_step(self.engine, lambda index=index: self.task.valid_batches(index), self.microbatches,
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


def _base_keys(task: Task):
    return (lambda key: not task.new_keys(key)) if task.adapter_only else None


def train(cfg, engine, task: Task, rank: int, world: int, device) -> dict:
    """Run `task` to cfg.train.steps. Returns {"steps", "final", "checkpoint"}, or {"preempted_at"} /
    {"stopped_at"} when the run ends early on purpose."""
    t = cfg.train
    start_step, source = 0, None
    if cfg.checkpoint.resume and ckpt.latest(cfg.checkpoint_dir) is not None:
        source = ckpt.latest(cfg.checkpoint_dir)
        if task.adapter_only:
            ckpt.load(cfg.checkpoint.load_weights, engine.chunks, fresh=task.new_keys)
        start_step = ckpt.load(source, engine.chunks, engine.optimizer, engine.scheduler,
                               fresh=_base_keys(task))["step"]
        for name, companion in task.companions.items():
            ckpt.load(Path(cfg.checkpoint_dir) / name / ckpt.name(start_step), companion.chunks,
                      companion.optimizer, companion.scheduler)
    elif cfg.checkpoint.load_weights:
        source = ckpt.resolve(cfg.checkpoint.load_weights)
        ckpt.load(source, engine.chunks, fresh=task.new_keys)

    metrics = MetricsLogger(cfg.run_dir, cfg.logging, t.steps, enabled=rank == 0, resumed=start_step > 0)
    if rank == 0:
        p = cfg.parallel
        print(f"kiln {task.name}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size} | "
              f"TP={p.tp} PP={p.pp}{f' VPP={p.vpp}' if p.vpp else ''} DP={engine.dp_size}"
              f"{' +SP' if p.sequence_parallel else ''} on {world} {device.type} process(es) | "
              f"{cfg.num_microbatches(world)} microbatches/step | {engine.precision}{task.describe}", flush=True)
        if source is not None:
            print(f"loaded {source} at step {start_step}", flush=True)
    runner = StepRunner(cfg, engine, task, metrics, device, world)
    preemption = PreemptionHandler(t.preempt_signals)
    last: dict = {}
    step = start_step
    try:
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
    return {"steps": step, "final": last, "checkpoint": str(Path(cfg.checkpoint_dir) / ckpt.name(step))}
