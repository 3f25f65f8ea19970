"""kiln's training step against a bare megatron-core loop: same ~10M-parameter model, same data.

Both run in this one process, in alternating blocks of steps, so machine drift hits both
alike. kiln's step is the loop's own StepRunner (data, schedule, optimizer, NaN checks,
metrics.jsonl); the bare loop is what a megatron-core example does by hand. Prints the
median step time of each and their ratio. Target: kiln <= 1.05 x bare.

    python benchmarks/engine_overhead.py [--rounds 6] [--steps-per-round 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from kiln.bootstrap import quiet_library_warnings
from kiln.config import (
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    PretrainConfig,
    ScheduleConfig,
    TrainConfig,
)
from kiln.recipes.models import llama


def config(run_dir: str, steps: int) -> PretrainConfig:
    return PretrainConfig(
        run_dir=run_dir,
        model=llama(4, 256, 4, 4, 1024, vocab_size=16384, rotary_base=10_000, max_position_embeddings=256),
        parallel=ParallelConfig(tp=1, pp=1),
        train=TrainConfig(steps=steps, micro_batch_size=4, global_batch_size=8, seq_length=256),
        optimizer=OptimizerConfig(lr=1e-4, min_lr=1e-5),
        schedule=ScheduleConfig(style="cosine", warmup_steps=0),
        data=DataConfig(mock=True),
        logging=LoggingConfig(log_interval=10**9, tensorboard=False, progress_bar=False),
    )


class BareLoop:
    """A hand-written megatron-core loop: GPTModel, DDP, optimizer, schedule, nothing else."""

    def __init__(self, cfg: PretrainConfig, dataset, device):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from kiln.training.model import transformer_config

        self.cfg, self.dataset, self.device = cfg, dataset, device
        tconfig = transformer_config(cfg.model, cfg.parallel, "fp32")
        torch.manual_seed(cfg.train.seed)
        model = GPTModel(tconfig, get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=cfg.model.padded_vocab_size(1), max_sequence_length=256,
                         position_embedding_type="rope", rotary_base=10_000)
        self.model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                             model.to(device))
        tconfig.finalize_model_grads_func = finalize_model_grads
        tconfig.no_sync_func = self.model.no_sync
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            McoreOptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 adam_beta1=o.beta1, adam_beta2=o.beta2, clip_grad=o.clip_grad),
            [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, 0.0, o.lr, o.min_lr, 0, cfg.train.steps, "cosine", o.weight_decay,
            o.weight_decay, cfg.train.steps, "constant")
        self.forward_backward = get_forward_backward_func()

    def step(self, step: int) -> float:
        t = self.cfg.train
        mb = t.global_batch_size // t.micro_batch_size

        def batches():
            for m in range(mb):
                start = step * t.global_batch_size + m * t.micro_batch_size
                samples = [self.dataset[i] for i in range(start, start + t.micro_batch_size)]
                yield {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "position_ids")}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

            def loss_func(output):
                loss = output.float().sum()
                tokens = torch.tensor(output.numel(), dtype=torch.int)
                return loss, tokens, {"loss": torch.stack([loss.detach(), tokens.float()])}

            return out, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.forward_backward(forward_step_func=forward_step, data_iterator=batches(),
                                        model=[self.model], num_microbatches=mb, seq_length=t.seq_length,
                                        micro_batch_size=t.micro_batch_size, forward_only=False)
        self.optimizer.step()
        self.scheduler.step(1)
        total = torch.stack([r["loss"] for r in reports]).sum(0)
        return (total[0] / total[1]).item()


def main() -> None:
    quiet_library_warnings()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=4)
    args = parser.parse_args()

    from kiln.data import gpt_dataset
    from kiln.training import cpu, distributed
    from kiln.training.engine import build_engine
    from kiln.training.loop import StepRunner
    from kiln.training.metrics import MetricsLogger
    from kiln.training.pretrain import _tokenizer, pretraining_task, resolve

    steps = args.rounds * args.steps_per_round + 2
    run_dir = tempfile.mkdtemp(prefix="kiln-bench-")
    cfg = resolve(config(run_dir, steps))
    if not torch.cuda.is_available():
        cpu.enable()
    device = distributed.init_process_group(distributed.process_env())
    distributed.init_model_parallel(cfg.parallel, cfg.train.seed)

    engine = build_engine(cfg, device)
    train_ds, _ = gpt_dataset.build_datasets(cfg.data, cfg.train, _tokenizer(cfg), f"{run_dir}/cache")
    metrics = MetricsLogger(run_dir, cfg.logging, steps, enabled=True)
    kiln_step = StepRunner(cfg, engine, pretraining_task(cfg, engine, train_ds, {}, 1, device), metrics, device, 1)
    bare = BareLoop(cfg, train_ds, device)
    params = sum(p.numel() for p in bare.model.parameters())

    times = {"kiln": [], "bare": []}
    kiln_step(0)  # warm-up: first-touch allocation, index caches
    bare.step(0)
    step = 1
    for _ in range(args.rounds):
        for name, run in (("kiln", kiln_step), ("bare", bare.step)):
            for i in range(args.steps_per_round):
                tic = time.perf_counter()
                run(step + i)
                times[name].append(time.perf_counter() - tic)
        step += args.steps_per_round
    metrics.close()
    distributed.destroy_model_parallel()

    kiln_s, bare_s = statistics.median(times["kiln"]), statistics.median(times["bare"])
    print(f"model: {params / 1e6:.1f}M parameters, {cfg.train.global_batch_size}x{cfg.train.seq_length} "
          f"tokens/step, {len(times['kiln'])} timed steps each, alternating blocks of {args.steps_per_round}")
    print(f"bare megatron-core: {bare_s * 1000:.1f} ms/step (median)")
    print(f"kiln engine:        {kiln_s * 1000:.1f} ms/step (median)")
    print(f"ratio kiln / bare:  {kiln_s / bare_s:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
