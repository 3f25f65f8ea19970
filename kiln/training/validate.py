"""Checks a resolved training config before any process group or tensor exists.

Every rule raises ConfigError naming the field, the values and a fix, so a bad
layout fails in the submitting shell instead of minutes into a cluster job.
"""

from __future__ import annotations

from kiln.config import ChatDataConfig, ConfigError, PretrainConfig


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate(cfg: PretrainConfig, world_size: int) -> None:
    """Raise ConfigError for the first rule `cfg` breaks on `world_size` processes."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name, value in [
        ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size), ("model.num_attention_heads", m.num_attention_heads),
        ("train.micro_batch_size", t.micro_batch_size), ("train.global_batch_size", t.global_batch_size),
        ("train.seq_length", t.seq_length), ("train.steps", t.steps),
    ]:
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")

    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={p.world_size} but {world_size} processes were launched: launch "
            f"{p.world_size} (--nproc, or nodes x tasks per node), or set parallel.world_size=null"
        )
    mp = p.tp * p.pp
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
            f"{p.tp} x {p.pp} = {mp}: launch a multiple of {mp} processes "
            f"(--nproc, or tasks x nodes under Slurm), or change parallel.tp / parallel.pp"
        )
    dp = world_size // mp

    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tp={p.tp}: pick a TP size among {_divisors(m.num_attention_heads)}"
        )
    if m.heads_kv % p.tp:
        raise ConfigError(
            f"model.num_query_groups={m.heads_kv} (KV heads) is not divisible by parallel.tp={p.tp}: "
            f"pick a TP size among {_divisors(m.heads_kv)}"
        )
    if m.num_attention_heads % m.heads_kv:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={m.heads_kv}: each KV head must serve a whole group of query heads"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}: change one, or set model.kv_channels (the head dim) explicitly"
        )

    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp = "
            f"{p.pp} x {p.vpp or 1} = {stages}: use a layer count that is a multiple of {stages}, "
            f"or another pipeline split"
        )
    if p.vpp is not None and p.pp < 2:
        raise ConfigError(
            f"parallel.vpp={p.vpp} needs parallel.pp >= 2: interleaving splits a pipeline stage, "
            f"so unset parallel.vpp or raise parallel.pp"
        )
    if p.sequence_parallel and p.tp < 2:
        raise ConfigError(
            "parallel.sequence_parallel=true needs parallel.tp >= 2: it splits activations across "
            "the TP group, so set parallel.tp or turn sequence_parallel off"
        )
    if p.sequence_parallel and t.seq_length % p.tp:
        raise ConfigError(
            f"train.seq_length={t.seq_length} is not divisible by parallel.tp={p.tp}, which "
            f"sequence parallelism needs: use a multiple of {p.tp}"
        )

    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x DP = {t.micro_batch_size} x {dp} = {per_step}: "
            f"set it to a multiple of {per_step}, e.g. {per_step * max(1, t.global_batch_size // per_step)}"
        )
    microbatches = t.global_batch_size // per_step
    if p.vpp is not None and microbatches % p.pp:
        raise ConfigError(
            f"{microbatches} microbatches per step is not a multiple of parallel.pp={p.pp}, "
            f"which the interleaved schedule (parallel.vpp) needs: raise train.global_batch_size"
        )

    if t.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}: shorten train.seq_length or raise "
            f"model.max_position_embeddings"
        )

    if m.vocab_size is None:
        raise ConfigError(
            "model.vocab_size is unset and no tokenizer gives it: set data.tokenizer to a tokenizer "
            "directory, or set model.vocab_size"
        )
    if m.make_vocab_size_divisible_by < 1 or m.make_vocab_size_divisible_by % 128:
        raise ConfigError(
            f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} must be a positive "
            f"multiple of 128, so each TP shard of the embedding stays aligned: use 128"
        )

    s = cfg.schedule
    decay = s.decay_steps or t.steps
    if s.warmup_steps >= decay and s.style != "constant":
        raise ConfigError(
            f"schedule.warmup_steps={s.warmup_steps} must be below the decay length {decay} "
            f"(schedule.decay_steps, or train.steps when unset): shorten the warmup or train longer"
        )
    if s.style == "wsd" and s.wsd_decay_steps is not None and s.wsd_decay_steps > decay - s.warmup_steps:
        raise ConfigError(
            f"schedule.wsd_decay_steps={s.wsd_decay_steps} is longer than the steps after warmup "
            f"({decay - s.warmup_steps}): shorten it"
        )
    if t.eval_interval and t.eval_steps < 1:
        raise ConfigError("train.eval_steps must be at least 1 when train.eval_interval is set")

    if t.precision == "fp16" and not _cuda():
        raise ConfigError("train.precision=fp16 needs a GPU: use fp32 (or auto) on CPU")
    if isinstance(cfg.data, ChatDataConfig):
        _validate_finetune(cfg)
    elif not cfg.data.mock and not cfg.data.blend:
        raise ConfigError(
            "data.blend is empty: give an indexed dataset prefix (the path without .bin/.idx), "
            "e.g. data.blend=[data/corpus_text_document], made by `kiln prepare`"
        )


def _validate_finetune(cfg) -> None:
    from pathlib import Path

    from kiln.data.chat import BUILTIN

    d = cfg.data
    for name in ("train", "valid"):
        path = getattr(d, name)
        if (name == "train" or path) and not Path(path or "").is_file():
            raise ConfigError(f"data.{name}={path!r} is not a file: give a JSONL file (see README, Post-training)")
    if not d.tokenizer:
        raise ConfigError("data.tokenizer is unset: give the tokenizer directory of the model being tuned")
    if d.chat_template not in (*BUILTIN, "tokenizer"):
        raise ConfigError(f"data.chat_template={d.chat_template!r}: use 'tokenizer' or one of {', '.join(BUILTIN)}")
    lora = getattr(cfg, "lora", None)
    adapted = lora is not None and lora.enabled
    if cfg.parallel.sequence_parallel and (adapted or type(cfg).__name__ in ("RMConfig", "RLHFConfig")):
        raise ConfigError("parallel.sequence_parallel is not supported with LoRA, reward or value heads: "
                          "set parallel.sequence_parallel=false")
    if adapted and (lora.rank < 1 or lora.alpha <= 0):
        raise ConfigError(f"lora.rank={lora.rank}, lora.alpha={lora.alpha}: both must be positive")
    if d.packing and _cuda() and cfg.train.micro_batch_size != 1 and type(cfg).__name__ == "SFTConfig":
        raise ConfigError("data.packing on GPU uses THD packed sequences, one per microbatch: set "
                          "train.micro_batch_size=1 and raise global_batch_size instead")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
