"""megatron-core optimizer and LR schedule from kiln's OptimizerConfig and ScheduleConfig."""

from __future__ import annotations

from kiln.config import OptimizerConfig, ScheduleConfig

_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def build_optimizer(opt: OptimizerConfig, chunks: list, precision: str):
    """megatron-core's optimizer (FP32, mixed precision or distributed) over the model chunks."""
    import torch
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    config = McoreOptimizerConfig(
        optimizer="adam",
        decoupled_weight_decay=opt.name == "adamw",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.beta1,
        adam_beta2=opt.beta2,
        adam_eps=opt.eps,
        clip_grad=opt.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32),
        use_distributed_optimizer=opt.distributed,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(opt: OptimizerConfig, schedule: ScheduleConfig, optimizer, train_steps: int):
    """megatron-core's OptimizerParamScheduler, stepped once per iteration."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = schedule.decay_steps or train_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=schedule.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=_DECAY_STYLES[schedule.style],
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=(schedule.wsd_decay_steps or max(1, decay_steps // 5))
        if schedule.style == "wsd" else None,
        lr_wsd_decay_style=schedule.wsd_decay_style if schedule.style == "wsd" else None,
    )
