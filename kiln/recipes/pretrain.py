"""Pretraining recipes: plain functions returning a complete PretrainConfig.

Fields are set explicitly in groups (model, parallelism, training, optimizer,
schedule, checkpointing), so a recipe reads as the run it describes. Override
any field from the CLI (`parallel.tp=2`) or in Python before launching.
"""

from __future__ import annotations

from kiln.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    PretrainConfig,
    ScheduleConfig,
    TrainConfig,
)
from kiln.recipes import models

DEMO_DATA = "runs/demo/data"  # written by `kiln prepare` from data/demo/corpus.jsonl (make demo)


def tiny() -> PretrainConfig:
    """CPU smoke run: a 4-layer Llama on the shipped demo corpus, TP=2 on 2 processes."""
    return PretrainConfig(
        run_dir="runs/tiny",
        model=models.tiny_llama(),  # vocab from the tokenizer
        parallel=ParallelConfig(tp=2, pp=1, world_size=2),
        train=TrainConfig(steps=60, micro_batch_size=4, global_batch_size=16, seq_length=128,
                          seed=1234, eval_interval=20, eval_steps=1),
        optimizer=OptimizerConfig(name="adamw", lr=3e-3, min_lr=3e-4, weight_decay=0.01,
                                  clip_grad=1.0),
        schedule=ScheduleConfig(style="cosine", warmup_steps=5),
        data=DataConfig(blend=[f"{DEMO_DATA}/corpus_text_document"], split="95,5,0",
                        tokenizer=f"{DEMO_DATA}/tokenizer"),
        checkpoint=CheckpointConfig(save_interval=30, keep_last=2),
        logging=LoggingConfig(log_interval=5),
    )


def smoke() -> PretrainConfig:
    """CI smoke run: `tiny` for 20 steps with fixed numerics, on the machine at hand: TP=2 on two
    CPU processes (fp32; must reproduce tests/assets/losses/pretrain_smoke.json), or ONE GPU
    (world size 1: two NCCL ranks cannot share a device; bf16, TransformerEngine)."""
    import torch

    cfg = tiny()
    cfg.run_dir = "runs/smoke/pretrain"
    tp = 1 if torch.cuda.is_available() else 2
    cfg.parallel = ParallelConfig(tp=tp, pp=1, world_size=tp)
    cfg.train.steps = 20
    cfg.train.eval_interval = 10
    cfg.checkpoint.save_interval = 0
    cfg.logging.log_interval = 5
    return cfg


def gpt2_124m() -> PretrainConfig:
    """GPT-2 small on one 8-GPU node: pure data parallelism, the model fits one GPU."""
    return PretrainConfig(
        run_dir="runs/gpt2_124m",
        model=models.gpt2_124m(),
        parallel=ParallelConfig(tp=1, pp=1, world_size=8),
        train=TrainConfig(steps=20_000, micro_batch_size=16, global_batch_size=512,
                          seq_length=1024, eval_interval=1000, eval_steps=10, precision="bf16"),
        optimizer=OptimizerConfig(name="adamw", lr=6e-4, min_lr=6e-5, weight_decay=0.1,
                                  beta2=0.95, clip_grad=1.0, distributed=True),
        schedule=ScheduleConfig(style="cosine", warmup_steps=700),
        data=DataConfig(blend=["data/gpt2/corpus_text_document"], tokenizer="data/gpt2/tokenizer"),
        checkpoint=CheckpointConfig(save_interval=1000, keep_last=3),
    )


def llama3_8b() -> PretrainConfig:
    """Llama 3 8B on 8 H100 (one node): TP=2 with sequence parallelism inside NVLink pairs,
    DP=4 with the distributed optimizer so Adam state is sharded four ways."""
    return PretrainConfig(
        run_dir="runs/llama3_8b",
        model=models.llama3_8b(),
        parallel=ParallelConfig(tp=2, pp=1, sequence_parallel=True, world_size=8),
        train=TrainConfig(steps=100_000, micro_batch_size=1, global_batch_size=128,
                          seq_length=8192, eval_interval=2000, eval_steps=10, precision="bf16"),
        optimizer=OptimizerConfig(name="adamw", lr=3e-4, min_lr=3e-5, weight_decay=0.1,
                                  beta2=0.95, clip_grad=1.0, distributed=True),
        schedule=ScheduleConfig(style="cosine", warmup_steps=2000),
        data=DataConfig(blend=["data/llama3/corpus_text_document"], tokenizer="data/llama3/tokenizer"),
        checkpoint=CheckpointConfig(save_interval=1000, keep_last=3),
    )


def llama3_70b() -> PretrainConfig:
    """Llama 3 70B on 64 H100 (8 nodes): TP=8 within a node, PP=4 across nodes with 5 virtual
    stages each (4 layers per chunk) to shrink the pipeline bubble, DP=2."""
    return PretrainConfig(
        run_dir="runs/llama3_70b",
        model=models.llama3_70b(),
        parallel=ParallelConfig(tp=8, pp=4, vpp=5, sequence_parallel=True, world_size=64),
        train=TrainConfig(steps=100_000, micro_batch_size=1, global_batch_size=512,
                          seq_length=8192, eval_interval=2000, eval_steps=10, precision="bf16"),
        optimizer=OptimizerConfig(name="adamw", lr=1.5e-4, min_lr=1.5e-5, weight_decay=0.1,
                                  beta2=0.95, clip_grad=1.0, distributed=True),
        schedule=ScheduleConfig(style="cosine", warmup_steps=2000),
        data=DataConfig(blend=["data/llama3/corpus_text_document"], tokenizer="data/llama3/tokenizer"),
        checkpoint=CheckpointConfig(save_interval=500, keep_last=2),
    )


def tiny_moe() -> PretrainConfig:
    """CPU run of a mixture of experts: `tiny` with 4 experts per layer, top-2, split over 2
    processes by expert parallelism (EP=2, DP=2 for the rest), tokens sent by all-to-all."""
    cfg = tiny()
    cfg.run_dir = "runs/tiny_moe"
    cfg.model = models.tiny_moe()
    cfg.parallel = ParallelConfig(tp=1, pp=1, ep=2, moe_dispatcher="alltoall", world_size=2)
    return cfg


def mixtral_8x7b() -> PretrainConfig:
    """Mixtral 8x7B on 64 H100 (8 nodes): EP=8 puts one expert of each layer per GPU pair, PP=4
    splits the 32 layers across nodes, TP=2 with sequence parallelism (also over each expert's
    14336-wide MLP) halves the activations, which otherwise fill 43 of ~62 GiB without
    recomputation (`--dryrun`: ~35 GiB per rank as set here); the distributed optimizer shards Adam."""
    return PretrainConfig(
        run_dir="runs/mixtral_8x7b",
        model=models.mixtral_8x7b(),
        parallel=ParallelConfig(tp=2, pp=4, ep=8, sequence_parallel=True, moe_dispatcher="alltoall",
                                world_size=64),
        train=TrainConfig(steps=100_000, micro_batch_size=1, global_batch_size=512,
                          seq_length=4096, eval_interval=2000, eval_steps=10, precision="bf16"),
        optimizer=OptimizerConfig(name="adamw", lr=1e-4, min_lr=1e-5, weight_decay=0.1,
                                  beta2=0.95, clip_grad=1.0, distributed=True),
        schedule=ScheduleConfig(style="cosine", warmup_steps=2000),
        data=DataConfig(blend=["data/mixtral/corpus_text_document"], tokenizer="data/mixtral/tokenizer"),
        checkpoint=CheckpointConfig(save_interval=500, keep_last=2),
    )


def qwen3_30b_a3b() -> PretrainConfig:
    """Qwen3-30B-A3B on 16 H100 (2 nodes): EP=8 (16 of the 128 experts per GPU), PP=2 (24 layers
    per stage), TP=2 with sequence parallelism for attention and activations while each 768-wide
    expert stays whole (expert TP 1, expert DP 1); `--dryrun`: ~52 GiB per rank."""
    return PretrainConfig(
        run_dir="runs/qwen3_30b_a3b",
        model=models.qwen3_30b_a3b(),
        parallel=ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True, moe_dispatcher="alltoall",
                                world_size=16),
        train=TrainConfig(steps=100_000, micro_batch_size=1, global_batch_size=512,
                          seq_length=4096, eval_interval=2000, eval_steps=10, precision="bf16"),
        optimizer=OptimizerConfig(name="adamw", lr=3e-4, min_lr=3e-5, weight_decay=0.1,
                                  beta2=0.95, clip_grad=1.0, distributed=True),
        schedule=ScheduleConfig(style="cosine", warmup_steps=2000),
        data=DataConfig(blend=["data/qwen3/corpus_text_document"], tokenizer="data/qwen3/tokenizer"),
        checkpoint=CheckpointConfig(save_interval=500, keep_last=2),
    )


RECIPES = {f.__name__: f for f in (tiny, smoke, tiny_moe, gpt2_124m, llama3_8b, llama3_70b, mixtral_8x7b,
                                   qwen3_30b_a3b)}
