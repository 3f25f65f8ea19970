"""The training engine: megatron-core model chunks, optimizer and schedule, and one step of
forward/backward over microbatches with megatron-core's pipeline schedules.

Stages that train (pretraining, SFT, alignment) share it and differ only in the
forward-step function they pass to `train_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kiln.config import PretrainConfig
from kiln.training.model import build_model, resolve_precision
from kiln.training.optim import build_optimizer, build_scheduler

# forward_step(batch, model) -> (output_tensor, loss_func); loss_func(output) -> (sum, tokens, report)
ForwardStep = Callable


@dataclass
class Engine:
    chunks: list  # megatron-core DDP-wrapped GPTModel chunks (several with virtual pipeline)
    tconfig: object  # megatron-core TransformerConfig
    optimizer: object
    scheduler: object
    device: torch.device
    precision: str

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()


def build_engine(cfg: PretrainConfig, device: torch.device, transform: Callable | None = None) -> Engine:
    """`transform(gpt)` changes each GPTModel chunk before it is wrapped (LoRA, a scalar head)."""
    from megatron.core.distributed import finalize_model_grads

    precision = resolve_precision(cfg.train.precision)
    torch.manual_seed(cfg.train.seed)  # host-side initialisation of the weights
    chunks, tconfig = build_model(cfg.model, cfg.parallel, precision, device, cfg.optimizer.distributed,
                                  transform)
    optimizer = scheduler = None
    if cfg.train.steps:  # an eval-only run (train.steps=0) needs neither
        optimizer = build_optimizer(cfg.optimizer, chunks, precision)
        scheduler = build_scheduler(cfg.optimizer, cfg.schedule, optimizer, cfg.train.steps)
    # without these two hooks megatron-core never all-reduces DP gradients, and nothing errors
    tconfig.finalize_model_grads_func = finalize_model_grads
    no_sync = [c.no_sync for c in chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if precision == "fp16" and optimizer is not None:
        tconfig.grad_scale_func = optimizer.scale_loss
    return Engine(chunks, tconfig, optimizer, scheduler, device, precision)


def run_schedule(chunks: list, make_batches: Callable[[], Iterator[dict]], num_microbatches: int,
                 seq_length: int, micro_batch_size: int, forward_step: ForwardStep,
                 forward_only: bool) -> list:
    """megatron-core's pipeline schedule over `chunks`; returns the last stage's loss reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step_fn(data_iterator, model):
        return forward_step(next(data_iterator), model)

    # one iterator per model chunk: with interleaving each chunk consumes every microbatch
    iterators = [make_batches() for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def reduce_reports(reports: list, names: tuple[str, ...], device: torch.device) -> dict[str, float]:
    """Sum each [value_sum, token_count] report over microbatches and DP ranks, and hand the
    result to every rank. Only the last pipeline stage computes losses, and its TP ranks hold
    copies, so exactly one rank per DP replica contributes."""
    from megatron.core import parallel_state as ps

    contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    if contributes:
        for report in reports:
            for i, name in enumerate(names):
                totals[i] += report[name].to(totals)
    torch.distributed.all_reduce(totals)
    return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


def train_step(engine: Engine, make_batches, num_microbatches: int, seq_length: int,
               micro_batch_size: int, forward_step: ForwardStep,
               report_names: tuple[str, ...] = ("loss",)) -> dict[str, float]:
    """One optimizer step over `num_microbatches`; returns reduced reports, grad norm and lr."""
    for chunk in engine.chunks:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    reports = run_schedule(engine.chunks, make_batches, num_microbatches, seq_length, micro_batch_size,
                            forward_step, forward_only=False)
    lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step applies
    updated, grad_norm, _zeros = engine.optimizer.step()
    # fp16: a step whose gradients overflowed is skipped (the loss scale backs off); the schedule
    # stays where it is, as Megatron-LM's train_step does, so the skipped step costs no LR decay
    if updated:
        engine.scheduler.step(increment=1)
    result = reduce_reports(reports, report_names, engine.device)
    result["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    result["lr"] = lr
    if not updated:
        result["skipped"] = 1.0
    return result


@torch.no_grad()
def eval_step(engine: Engine, make_batches, num_microbatches: int, seq_length: int,
              micro_batch_size: int, forward_step: ForwardStep,
              report_names: tuple[str, ...] = ("loss",)) -> dict[str, float]:
    for chunk in engine.chunks:
        chunk.eval()
    try:
        reports = run_schedule(engine.chunks, make_batches, num_microbatches, seq_length, micro_batch_size,
                                forward_step, forward_only=True)
    finally:
        for chunk in engine.chunks:
            chunk.train()
    return reduce_reports(reports, report_names, engine.device)


def lm_forward_step(batch: dict, model):
    """Next-token prediction: GPTModel returns per-token losses when given labels."""
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, lambda out: lm_loss(out, batch["loss_mask"])


def lm_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    mask = loss_mask.float()
    loss = (per_token_loss.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"loss": torch.stack([loss.detach(), mask.sum()])}
