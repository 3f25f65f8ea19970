"""Checks a training config before any process group or tensor exists.

Every rule names the field, the values and a fix, and every broken rule is reported at once,
so a bad layout fails in the submitting shell instead of minutes into a cluster job. The
launcher runs these (they are the training stages' registered validators); each rank runs
them again on the config it received.
"""

from __future__ import annotations

import re
from pathlib import Path

from kiln.artifact import read_manifest
from kiln.config import ChatDataConfig, PretrainConfig
from kiln.training import trackers
from kiln.training.shapes import check_weights
from kiln.validation import Check, Problems, check_output_dir, check_ranges


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate(cfg: PretrainConfig, check: Check | int) -> None:
    """Raise one ConfigError listing every rule `cfg` breaks (`check`: a Check or a world size)."""
    check = check if isinstance(check, Check) else Check(world_size=check)
    problems = Problems()
    rules(cfg, check, problems)
    problems.raise_if_any("the training config")


def rules(cfg: PretrainConfig, check: Check, problems: Problems) -> None:
    before = len(problems.lines)
    check_ranges(cfg, problems)
    if any(line.startswith(("parallel.", "model.", "train.")) for line in problems.lines[before:]):
        return  # the layout rules below divide by these values
    layout_rules(cfg, check.world_size, problems)
    moe_rules(cfg, check.world_size, problems)
    if cfg.train.steps:
        schedule_rules(cfg, problems)
    else:
        eval_only_rules(cfg, check, problems)
    check_output_dir("run_dir", cfg.run_dir, problems)
    trackers.rules(cfg.logging, problems)
    if isinstance(cfg.data, ChatDataConfig):
        finetune_rules(cfg, check, problems)
    else:
        pretrain_data_rules(cfg, check, problems)
    if cfg.checkpoint.load_weights:
        m = cfg.model
        padded = m.padded_vocab_size(cfg.parallel.tp) if m.vocab_size else None
        check_weights("checkpoint.load_weights", cfg.checkpoint.load_weights, m, padded, check, problems)


def layout_rules(cfg: PretrainConfig, world_size: int, problems: Problems) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.world_size is not None and p.world_size != world_size:
        problems.add(
            f"parallel.world_size={p.world_size} but {world_size} processes were launched: launch "
            f"{p.world_size} (--nproc, or nodes x tasks per node), or set parallel.world_size=null"
        )
    mp = p.tp * p.pp
    divisible = world_size % mp == 0
    if not divisible:
        problems.add(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
            f"{p.tp} x {p.pp} = {mp}: launch a multiple of {mp} processes "
            f"(--nproc, or tasks x nodes under Slurm), or change parallel.tp / parallel.pp"
        )
    if m.num_attention_heads % p.tp:
        problems.add(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tp={p.tp}: pick a TP size among {_divisors(m.num_attention_heads)}"
        )
    if m.heads_kv % p.tp:
        problems.add(
            f"model.num_query_groups={m.heads_kv} (KV heads) is not divisible by parallel.tp={p.tp}: "
            f"pick a TP size among {_divisors(m.heads_kv)}"
        )
    if m.num_attention_heads % m.heads_kv:
        problems.add(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={m.heads_kv}: each KV head must serve a whole group of query heads"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        problems.add(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}: change one, or set model.kv_channels (the head dim) explicitly"
        )
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        problems.add(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp = "
            f"{p.pp} x {p.vpp or 1} = {stages}: use a layer count that is a multiple of {stages}, "
            f"or another pipeline split"
        )
    if p.vpp is not None and p.pp < 2:
        problems.add(
            f"parallel.vpp={p.vpp} needs parallel.pp >= 2: interleaving splits a pipeline stage, "
            f"so unset parallel.vpp or raise parallel.pp"
        )
    if p.sequence_parallel and p.tp < 2:
        problems.add(
            "parallel.sequence_parallel=true needs parallel.tp >= 2: it splits activations across "
            "the TP group, so set parallel.tp or turn sequence_parallel off"
        )
    if p.sequence_parallel and t.seq_length % p.tp:
        problems.add(
            f"train.seq_length={t.seq_length} is not divisible by parallel.tp={p.tp}, which "
            f"sequence parallelism needs: use a multiple of {p.tp}"
        )
    if divisible:
        dp = world_size // mp
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            problems.add(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size x DP = {t.micro_batch_size} x {dp} = {per_step}: "
                f"set it to a multiple of {per_step}, e.g. {per_step * max(1, t.global_batch_size // per_step)}"
            )
        microbatches = t.global_batch_size // per_step
        if p.vpp is not None and microbatches % p.pp:
            problems.add(
                f"{microbatches} microbatches per step is not a multiple of parallel.pp={p.pp}, "
                f"which the interleaved schedule (parallel.vpp) needs: raise train.global_batch_size"
            )
    if t.seq_length > m.max_position_embeddings:
        problems.add(
            f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}: shorten train.seq_length or raise "
            f"model.max_position_embeddings"
        )
    if m.make_vocab_size_divisible_by % 128:
        problems.add(
            f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} must be a positive "
            f"multiple of 128, so each TP shard of the embedding stays aligned: use 128"
        )
    if t.precision == "fp16" and not _cuda():
        problems.add("train.precision=fp16 needs a GPU: use fp32 (or auto) on CPU")


def moe_rules(cfg: PretrainConfig, world_size: int, problems: Problems) -> None:
    """Experts and expert parallelism: each rule is one megatron-core would otherwise assert on
    (TransformerConfig.__post_init__, initialize_model_parallel, MoELayer), minutes into a job."""
    m, p = cfg.model, cfg.parallel
    moe, etp = m.moe, p.etp or p.tp
    if moe is None:
        if p.ep > 1 or p.etp is not None:
            problems.add(f"parallel.ep={p.ep}{f' parallel.etp={p.etp}' if p.etp is not None else ''} split "
                         f"experts, but model.moe is unset (a dense model): set model.moe (e.g. "
                         f"model.moe.num_experts=8), or parallel.ep=1 and parallel.etp=null")
        return
    if moe.num_experts % p.ep:
        problems.add(f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}: each EP "
                     f"rank holds the same number of experts; pick parallel.ep among {_divisors(moe.num_experts)}")
    expert_mp = p.pp * p.ep * etp
    if world_size % expert_mp:
        problems.add(f"world size {world_size} is not divisible by parallel.pp x parallel.ep x expert TP = "
                     f"{p.pp} x {p.ep} x {etp} = {expert_mp}: the expert layers split the ranks of each pipeline "
                     f"stage into EP x expert-TP x expert-DP; launch a multiple of {expert_mp} processes, or "
                     f"lower parallel.ep / parallel.etp")
    if p.etp is not None and p.etp not in (1, p.tp):
        problems.add(f"parallel.etp={p.etp}: expert TP must be 1 or parallel.tp={p.tp} (an expert TP that differs "
                     f"from both trained with other gradients than one process in kiln's parity check); set "
                     f"parallel.etp=1, or null for TP")
    if moe.topk > moe.num_experts:
        problems.add(f"model.moe.topk={moe.topk} exceeds model.moe.num_experts={moe.num_experts}: a token "
                     f"cannot go to more experts than there are; lower model.moe.topk")
    if moe.layer_pattern is not None:
        pattern = moe.layer_pattern
        if len(pattern) != m.num_layers or any(v not in (0, 1) for v in pattern):
            problems.add(f"model.moe.layer_pattern={pattern} must hold one 0 (dense) or 1 (MoE) per layer, "
                         f"model.num_layers={m.num_layers} entries: fix the list, or set it to null for "
                         f"experts in every layer")
        elif not any(pattern):
            problems.add("model.moe.layer_pattern has no MoE layer (all 0): set at least one 1, or unset "
                         "model.moe for a dense model")
    if m.expert_ffn_size % etp:
        problems.add(f"the expert hidden size {m.expert_ffn_size} (model.moe.ffn_hidden_size, else the "
                     f"model's) is not divisible by the expert TP size {etp} (parallel.etp, else parallel.tp): "
                     f"change one of them")
    if moe.shared_expert_ffn_size is not None and moe.shared_expert_ffn_size % p.tp:
        problems.add(f"model.moe.shared_expert_ffn_size={moe.shared_expert_ffn_size} is not divisible by "
                     f"parallel.tp={p.tp}: the shared expert is split like a dense MLP; change one of them")
    if moe.shared_expert_gate and moe.shared_expert_ffn_size is None:
        problems.add("model.moe.shared_expert_gate=true gates a shared expert, but "
                     "model.moe.shared_expert_ffn_size is unset: set it, or the gate to false")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        problems.add("model.moe.pad_to_capacity=true pads each expert's tokens to its capacity, but "
                     "model.moe.capacity_factor is unset: set it (e.g. 1.25), or pad_to_capacity=false")
    if moe.topk == 1 and moe.score_function == "softmax" and moe.normalize_topk:
        problems.add("model.moe.topk=1 with normalize_topk=true: a softmax over one chosen expert is always 1 "
                     "and the router would get no gradient; set model.moe.normalize_topk=false "
                     "(softmax over all experts first)")
    if moe.score_function == "sigmoid" and not moe.normalize_topk and moe.topk > 1:
        problems.add("model.moe.score_function=sigmoid with normalize_topk=false: megatron-core always "
                     "renormalises sigmoid top-k weights to sum to 1; set model.moe.normalize_topk=true")
    if m.add_bias_linear and etp != 1:
        problems.add(f"model.add_bias_linear=true with experts split over expert TP {etp}: megatron-core "
                     f"supports expert biases only at expert TP 1; set parallel.etp=1, or "
                     f"model.add_bias_linear=false")
    if p.tp > 1 and not p.sequence_parallel:
        problems.add(f"model.moe with parallel.tp={p.tp} needs parallel.sequence_parallel=true: megatron-core's "
                     f"MoE layer refuses to train on TP without it (each TP rank must route its own tokens)")


def schedule_rules(cfg: PretrainConfig, problems: Problems) -> None:
    s, t, o = cfg.schedule, cfg.train, cfg.optimizer
    decay = s.decay_steps or t.steps
    if s.warmup_steps >= decay and s.style != "constant":
        problems.add(
            f"schedule.warmup_steps={s.warmup_steps} must be below the decay length {decay} "
            f"(schedule.decay_steps, or train.steps when unset): shorten the warmup or train longer"
        )
    if s.style == "wsd" and s.wsd_decay_steps is not None and s.wsd_decay_steps > decay - s.warmup_steps:
        problems.add(
            f"schedule.wsd_decay_steps={s.wsd_decay_steps} is longer than the steps after warmup "
            f"({decay - s.warmup_steps}): shorten it"
        )
    if 0 < o.lr < o.min_lr:
        problems.add(f"optimizer.min_lr={o.min_lr} is above optimizer.lr={o.lr}: the schedule decays from lr to "
                     f"min_lr, so lower min_lr")


def eval_only_rules(cfg: PretrainConfig, check: Check, problems: Problems) -> None:
    """train.steps=0 scores a checkpoint on the validation data; it needs both, and a run_dir of its own."""
    c, d = cfg.checkpoint, cfg.data
    if not c.load_weights and not c.resume:
        problems.add("train.steps=0 (eval-only) scores a checkpoint: set checkpoint.load_weights=<checkpoint or "
                     "run dir>, or checkpoint.resume=true with checkpoint.dir holding one")
    elif not c.load_weights and check.files != "skip" and not (Path(cfg.checkpoint_dir) / "latest").exists():
        check.missing(problems, f"train.steps=0 (eval-only) with checkpoint.resume=true: {cfg.checkpoint_dir} holds no "
                                f"checkpoint (no `latest`): set checkpoint.load_weights or checkpoint.dir")
    if isinstance(d, ChatDataConfig):
        if type(cfg).__name__ == "RLHFConfig":
            problems.add("train.steps=0 (eval-only): rlhf has no validation data to score; use train.steps >= 1")
        elif not d.valid:
            problems.add("train.steps=0 (eval-only) scores the validation data, but data.valid is unset: "
                         "give data.valid=<JSONL file>")
    elif not d.mock and _valid_weight(d.split) == 0:
        problems.add(f"train.steps=0 (eval-only) scores the validation split, but data.split={d.split!r} gives it "
                     f"no weight: use e.g. data.split=98,2,0")
    run = Path(cfg.run_dir)
    if (run / "metrics.jsonl").exists() and not (read_manifest(run) or {}).get("summary", {}).get("eval_only"):
        problems.add(f"run_dir={cfg.run_dir} holds a training run, whose metrics.jsonl and kiln.json an eval-only "
                     f"run would replace: give a new run_dir and checkpoint.load_weights={cfg.run_dir}")


def _valid_weight(split: str) -> float:
    """The valid share of a "train,valid,test" split string, read as megatron-core reads it."""
    weights = [float(x) for x in re.findall(r"[.0-9]+", split)] + [0.0, 0.0]
    return weights[1]


def pretrain_data_rules(cfg: PretrainConfig, check: Check, problems: Problems) -> None:
    d = cfg.data
    if d.mock:
        if cfg.model.vocab_size is None:
            problems.add("data.mock=true needs model.vocab_size: there is no tokenizer to read it from")
        return
    if not d.blend:
        problems.add(
            "data.blend is empty: give an indexed dataset prefix (the path without .bin/.idx), "
            "e.g. data.blend=[data/corpus_text_document], made by `kiln prepare`"
        )
    prefixes = d.blend if len(d.blend) == 1 else d.blend[1::2]
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not check.will_exist(f"{prefix}{suffix}"):
                check.missing(problems,
                              f"data.blend: {prefix}{suffix} does not exist: run `kiln prepare` to make it, or "
                             f"correct the prefix (the path without .bin/.idx)")
                break
    _vocab_rule(cfg, check, d.tokenizer, problems)


def _vocab_rule(cfg, check: Check, tokenizer: str | None, problems: Problems) -> None:
    if cfg.model.vocab_size is not None:
        return
    if tokenizer and check.will_exist(tokenizer) and not Path(tokenizer).exists():
        return  # an earlier stage of this pipeline writes it; the rank reads the size from it
    if not tokenizer:
        problems.add("model.vocab_size is unset and no tokenizer gives it: set data.tokenizer to a tokenizer "
                     "directory, or set model.vocab_size")
    elif check.files != "skip" and not (Path(tokenizer) / "tokenizer.json").exists():
        problems.add(  # even a dry run needs the vocabulary to lay the model out
            f"data.tokenizer={tokenizer} holds no tokenizer.json: run `kiln prepare` first "
            f"(for the tiny recipe: `make demo`, or kiln prepare --input data/demo/corpus.jsonl "
            f"--output runs/demo/data), or point data.tokenizer at a tokenizer directory"
        )


def finetune_rules(cfg, check: Check, problems: Problems) -> None:
    from kiln.data.chat import BUILTIN

    d = cfg.data
    for name in ("train", "valid"):
        path = getattr(d, name)
        if (name == "train" or path) and not (Path(path or "").is_file() or (path and check.will_exist(path))):
            check.missing(problems,
                          f"data.{name}={path!r} is not a file: give a JSONL file (see README, Post-training)")
    if not d.tokenizer:
        problems.add("data.tokenizer is unset: give the tokenizer directory of the model being tuned")
    else:
        _vocab_rule(cfg, check, d.tokenizer, problems)
    if d.chat_template not in (*BUILTIN, "tokenizer"):
        problems.add(f"data.chat_template={d.chat_template!r}: use 'tokenizer' or one of {', '.join(BUILTIN)}")
    lora = getattr(cfg, "lora", None)
    adapted = lora is not None and lora.enabled
    on_experts = sorted({"linear_fc1", "linear_fc2"} & set(lora.target_modules)) if adapted else []
    if on_experts and cfg.model.moe is not None:
        problems.add(f"lora.target_modules={lora.target_modules}: in a mixture of experts {' and '.join(on_experts)} "
                     f"are the experts' own layers, split by expert parallelism, which kiln's LoRA does not adapt: "
                     f"set lora.target_modules=[linear_qkv,linear_proj] to adapt attention only")
    if cfg.parallel.sequence_parallel and (adapted or type(cfg).__name__ in ("RMConfig", "RLHFConfig")):
        problems.add("parallel.sequence_parallel is not supported with LoRA, reward or value heads: "
                     "set parallel.sequence_parallel=false")
    if d.packing and _cuda() and cfg.train.micro_batch_size != 1 and type(cfg).__name__ == "SFTConfig":
        problems.add("data.packing on GPU uses THD packed sequences, one per microbatch: set "
                     "train.micro_batch_size=1 and raise global_batch_size instead")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
