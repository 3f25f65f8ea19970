"""TensorRT-LLM checkpoint export: `config.json` + `rank{r}.safetensors`, r = pp_rank * tp + tp_rank.

Names and splits follow TensorRT-LLM's checkpoint documentation and its Llama converter
(tensorrt_llm/models/llama/convert.py): per rank, attention.qkv stacks that rank's q, k and v
rows (KV heads repeated when there are fewer than TP ranks); attention.dense and mlp.proj split
on dim 1; mlp.fc (HF gate_proj) and mlp.gate (HF up_proj) split on dim 0; the embedding lives on
the first pipeline stage, ln_f and lm_head (vocab padded to a multiple of TP) on the last; layer
indices restart at 0 on every stage. `trtllm-build` turns the directory into engines on a GPU
(build.sh); that step cannot run here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from kiln.artifact import atomic_dir, write_manifest
from kiln.config import ExportConfig, ModelConfig
from kiln.conversion.safetensors_io import Entry, StreamWriter
from kiln.conversion.source import DTYPES, Model, open_source
from kiln.errors import ConfigError
from kiln.export.moe import check_moe, mixtral_layer, moe_config, rank_moe
from kiln.validation import Check, Problems, check_inputs, check_output_dir, check_ranges, ensure_valid

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mixtral": "MixtralForCausalLM"}
# The TensorRT-LLM release build.sh runs in: 1.0.0 is the first stable 1.x with the TensorRT
# engine backend (trtllm-build), on CUDA 12.9; main has since removed trtllm-build. Engines are
# tied to the exact version that built them, so it is recorded in the manifest too.
TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.0.0"
# head sizes TensorRT-LLM's attention kernels (MMHA) accept; others fail in trtllm-build
ATTENTION_HEAD_SIZES = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)
TRTLLM_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def layer_tensors(model: Model, layer: int, meta: bool = False) -> dict[str, torch.Tensor]:
    """One layer's HF-named tensors (the family mapping turns megatron's layout back into HF's),
    each routed expert read on its own; with `meta`, shapes only."""
    out = {}
    for p in model.params:
        if not p.per_layer or layer not in p.layer_indices(model.config.num_layers):
            continue
        for expert in p.expert_indices():
            at = (layer,) if expert is None else (layer, expert)
            source = (torch.empty(model.shape(p.megatron)[len(at):], device="meta") if meta
                      else model.read(p.megatron, *at))
            out.update(zip(p.hf_names(layer, expert), p.transform.to_hf(source), strict=True))
    return {name.split(f".{layer}.", 1)[1]: t for name, t in out.items()}


def global_tensors(model: Model) -> dict[str, torch.Tensor]:
    out = {}
    for p in model.params:
        if not p.per_layer:
            out.update(zip(p.hf_names(), p.transform.to_hf(model.read(p.megatron)), strict=True))
    return out


def _repeat_kv(w: torch.Tensor, kv_heads: int, head_dim: int, tp: int) -> torch.Tensor:
    """KV heads copied so each of `tp` ranks holds whole heads (TensorRT-LLM's dup_kv_weight)."""
    if kv_heads >= tp:
        return w
    rest = w.shape[1:]
    return w.reshape(kv_heads, head_dim, *rest).repeat_interleave(tp // kv_heads, dim=0).reshape(-1, *rest)


def rank_layer(t: dict, m, tp: int, rank: int, prefix: str, dtype, ep: int = 1) -> dict[str, torch.Tensor]:
    d, kv = m.head_dim, m.heads_kv
    split0 = lambda w: w.chunk(tp, dim=0)[rank]  # noqa: E731
    out = {}
    for suffix in ("weight", "bias"):
        names = [f"self_attn.{p}_proj.{suffix}" for p in "qkv"]
        if names[0] not in t:
            continue
        q, k, v = (t[n] for n in names)
        k, v = _repeat_kv(k, kv, d, tp), _repeat_kv(v, kv, d, tp)
        out[f"{prefix}attention.qkv.{suffix}"] = torch.cat([split0(q), split0(k), split0(v)])
    out[f"{prefix}attention.dense.weight"] = t["self_attn.o_proj.weight"].chunk(tp, dim=1)[rank]
    if m.moe is None:
        out[f"{prefix}mlp.fc.weight"] = split0(t["mlp.gate_proj.weight"])
        out[f"{prefix}mlp.gate.weight"] = split0(t["mlp.up_proj.weight"])
        out[f"{prefix}mlp.proj.weight"] = t["mlp.down_proj.weight"].chunk(tp, dim=1)[rank]
    out[f"{prefix}input_layernorm.weight"] = t["input_layernorm.weight"]
    out[f"{prefix}post_layernorm.weight"] = t["post_attention_layernorm.weight"]
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}
    if m.moe is not None:  # the router stays float32
        router, expert = mixtral_layer(t)
        out.update(rank_moe(router, expert, m.moe.num_experts, tp, ep, rank, prefix, dtype))
    return out


def trtllm_config(m: ModelConfig, model_type: str, tp: int, pp: int, dtype: torch.dtype, ep: int = 1) -> dict:
    scaling = None
    if m.rope_scaling is not None:
        s = m.rope_scaling
        scaling = {"type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    config = {
        "architecture": ARCHITECTURES[model_type], "dtype": TRTLLM_DTYPES[dtype], "logits_dtype": "float32",
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings,
        "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.heads_kv, "head_size": m.head_dim,
        "hidden_act": "silu", "intermediate_size": m.ffn_size, "norm_epsilon": m.norm_epsilon,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": float(m.rotary_base), "rotary_scaling": scaling,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "share_embedding_table": False, "tie_word_embeddings": m.tie_embeddings,
        "attn_bias": m.add_qkv_bias, "mlp_bias": False,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if m.moe is not None:
        # TensorRT-LLM's MoE layer reads the gated activation from hidden_act (LLaMAConfig sets
        # "swiglu" for Mixtral); intermediate_size is each expert's
        config.update(hidden_act="swiglu", intermediate_size=m.expert_ffn_size, moe=moe_config(m))
        config["mapping"].update(moe_tp_size=tp // ep, moe_ep_size=ep)
    if model_type == "qwen2":
        # QWenDecoderLayer reads seq_length (for logn scaling, which stays off) with no default
        config.update(qwen_type="qwen2", seq_length=m.max_position_embeddings, use_logn_attn=False)
    return config


def sequence_limits(cfg: ExportConfig, positions: int) -> tuple[int, int]:
    """(max_input_len, max_seq_len) for the engine: TensorRT-LLM builds its RoPE table for
    max_position_embeddings rows only and merely warns beyond it, so longer is refused."""
    seq = cfg.max_seq_len if cfg.max_seq_len is not None else min(4096, positions)
    if seq > positions:
        raise ConfigError(f"max_seq_len={seq} exceeds the model's max_position_embeddings={positions}: the engine's "
                          f"positions would run past the rotary table; set max_seq_len <= {positions}")
    return min(cfg.max_input_len, seq), seq


def build_script(cfg: ExportConfig, max_input_len: int, max_seq_len: int, unbuildable: str | None = None) -> str:
    stop = [f"echo 'kiln: this checkpoint cannot be built: {unbuildable}' >&2", "exit 1"] if unbuildable else []
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# Builds TensorRT engines from this checkpoint, inside NGC's TensorRT-LLM {TRTLLM_IMAGE.rsplit(':', 1)[1]} "
        "image on a GPU host:",
        "#   docker run --gpus all --rm --ipc host --ulimit memlock=-1 --ulimit stack=67108864 \\",
        f"#     -v $PWD:/ckpt -w /ckpt {TRTLLM_IMAGE} bash build.sh",
        "set -euo pipefail",
        *stop,
        'cd "$(dirname "$0")"',
        "trtllm-build --checkpoint_dir . --output_dir engines \\",
        f"    --workers {cfg.tp * cfg.pp} \\",
        "    --gemm_plugin auto --gpt_attention_plugin auto \\",
        "    --remove_input_padding enable --kv_cache_type paged --context_fmha enable \\",
        f"    --max_batch_size {cfg.max_batch_size} --max_input_len {max_input_len} --max_seq_len {max_seq_len}",
        "",
    ])


def check_model(m: ModelConfig, model_type: str, tp: int, pp: int, ep: int, where: str) -> None:
    """The model-dependent rules, checked when the source is opened, before anything is written."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {model_type} has no TensorRT-LLM export here; the Llama family "
                          f"(llama, mistral, qwen2, mixtral) does. Use --to hf for TensorRT-LLM's LLM API")
    if m.num_attention_heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the {m.num_attention_heads} attention heads")
    if m.heads_kv % tp and tp % m.heads_kv:
        raise ConfigError(f"--tp {tp}: the {m.heads_kv} KV heads can neither be split nor repeated evenly")
    if m.num_layers % pp:
        raise ConfigError(f"--pp {pp} does not divide the {m.num_layers} layers")
    check_moe(m, tp, ep, model_type)
    if m.moe is None and m.ffn_size % tp:
        raise ConfigError(f"--tp {tp} does not divide the MLP's {m.ffn_size} intermediate features")


def write_checkpoint(out: Path, m: ModelConfig, model_type: str, layer, globals_: dict[str, torch.Tensor],
                     tp: int, pp: int, ep: int, dtype: torch.dtype) -> None:
    """config.json and every rank file. `layer(i, meta)` gives layer i's HF-named tensors (names
    below `model.layers.{i}.`; with `meta`, shapes only); `globals_` the embedding, final norm
    and lm_head, which the first and last stage need. Each rank file is planned from shapes,
    then filled one source layer at a time."""
    (out / "config.json").write_text(json.dumps(trtllm_config(m, model_type, tp, pp, dtype, ep), indent=2) + "\n")
    per_stage = m.num_layers // pp
    embed = globals_["model.embed_tokens.weight"]
    lm_head = globals_.get("lm_head.weight", embed)
    padded = tp * math.ceil(m.vocab_size / tp)
    lm_head = torch.cat([lm_head, lm_head.new_zeros(padded - m.vocab_size, lm_head.shape[1])])
    ends = {"transformer.ln_f.weight": globals_["model.norm.weight"]}
    meta_layer = layer(0, True)
    for stage in range(pp):
        plans = [_stage_plan(stage, rank, meta_layer, m, tp, pp, ep, per_stage, dtype, embed, lm_head, ends)
                 for rank in range(tp)]
        writers = [StreamWriter(out / f"rank{stage * tp + rank}.safetensors", plans[rank]) for rank in range(tp)]
        for writer in writers:
            if stage == 0:
                writer.write("transformer.vocab_embedding.weight", embed.to(dtype))
        for local in range(per_stage):
            t = layer(stage * per_stage + local, False)
            for rank, writer in enumerate(writers):
                for name, tensor in rank_layer(t, m, tp, rank, f"transformer.layers.{local}.", dtype, ep).items():
                    writer.write(name, tensor)
        for rank, writer in enumerate(writers):
            if stage == pp - 1:
                writer.write("transformer.ln_f.weight", ends["transformer.ln_f.weight"].to(dtype))
                writer.write("lm_head.weight", lm_head.chunk(tp)[rank].to(dtype))
            writer.close()


def export_trtllm(cfg: ExportConfig) -> dict:
    started = time.time()
    model = open_source(Path(cfg.source), 1, cfg.tokenizer)
    m = model.config
    check_model(m, model.model_type, cfg.tp, cfg.pp, cfg.ep, cfg.source)
    max_input_len, max_seq_len = sequence_limits(cfg, m.max_position_embeddings)
    unbuildable = None
    if m.head_dim not in ATTENTION_HEAD_SIZES:
        unbuildable = (f"head size {m.head_dim} is not one TensorRT-LLM's attention kernels support "
                       f"({', '.join(map(str, ATTENTION_HEAD_SIZES))})")
        print(f"kiln export: warning: {unbuildable}; the checkpoint is written and checked, build.sh refuses")
    dtype = DTYPES[cfg.dtype]
    tp, pp, ep = cfg.tp, cfg.pp, cfg.ep
    verify = cfg.verify if cfg.verify is not None else dtype == torch.float32
    with atomic_dir(cfg.output) as tmp:
        write_checkpoint(tmp, m, model.model_type, lambda i, meta: layer_tensors(model, i, meta),
                         global_tensors(model), tp, pp, ep, dtype)
        script = tmp / "build.sh"
        script.write_text(build_script(cfg, max_input_len, max_seq_len, unbuildable))
        script.chmod(0o755)
        delta = None
        if verify:
            from kiln.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens
            from kiln.export.reference import trtllm_logits

            tokens = sample_tokens(m.vocab_size)
            if model.describe.startswith("HF "):
                reference = hf_logits(model.tokenizer, tokens)
            else:
                reference = megatron_logits(model.read, m, tokens)
            layout = f"tp={tp}, pp={pp}" + (f", ep={ep}" if ep > 1 else "")
            delta = compare(reference, trtllm_logits(tmp, tokens), f"TensorRT-LLM export ({layout})")
        summary = {"tp": tp, "pp": pp, "ep": ep, "dtype": cfg.dtype, "verified": verify,
                   "max_abs_logit_delta": delta,
                   "trtllm_image": TRTLLM_IMAGE, "max_input_len": max_input_len, "max_seq_len": max_seq_len,
                   "buildable": unbuildable is None, **({"unbuildable": unbuildable} if unbuildable else {}),
                   "files": sorted(p.name for p in tmp.iterdir()), "seconds": round(time.time() - started, 2)}
        write_manifest(tmp, "export", dataclasses.asdict(cfg), [cfg.source], summary, started)
    return summary


def _stage_plan(stage, rank, meta_layer, m, tp, pp, ep, per_stage, dtype, embed, lm_head, ends) -> list[Entry]:
    plan = []
    if stage == 0:
        plan.append(Entry("transformer.vocab_embedding.weight", tuple(embed.shape), dtype))
    for local in range(per_stage):
        for name, t in rank_layer(meta_layer, m, tp, rank, f"transformer.layers.{local}.", dtype, ep).items():
            plan.append(Entry(name, tuple(t.shape), t.dtype))
    if stage == pp - 1:
        plan.append(Entry("transformer.ln_f.weight", tuple(ends["transformer.ln_f.weight"].shape), dtype))
        plan.append(Entry("lm_head.weight", (lm_head.shape[0] // tp, lm_head.shape[1]), dtype))
    return plan


def validate(cfg: ExportConfig, check: Check, problems: Problems) -> None:
    """What can be known before reading the source; the model-dependent rules (heads, layers and
    experts against --tp/--pp/--ep) are checked when the source is opened, before anything is written."""
    check_ranges(cfg, problems)
    check_inputs("source", cfg.source, "an HF directory, a kiln checkpoint, a NeMo 2 directory or a .nemo file",
                 check, problems)
    check_output_dir("output", cfg.output, problems)
    if cfg.to == "trtllm" and cfg.verify and cfg.dtype != "float32":
        problems.add("--verify compares logits within 1e-4, which needs --dtype float32 (verify, dtype)")
    if cfg.to == "trtllm" and cfg.tp % cfg.ep:
        problems.add(f"--ep {cfg.ep} does not divide --tp {cfg.tp}: TensorRT-LLM needs tp = ep x moe_tp (ep ranks "
                     f"of experts, each expert cut over tp / ep ranks); choose ep among the divisors of tp (ep, tp)")
    if cfg.to == "hf" and cfg.ep != 1:
        problems.add(f"--ep {cfg.ep} splits experts over TensorRT-LLM ranks; an HF directory is unsplit, leave ep=1")


def export(cfg: ExportConfig) -> dict:
    """`kiln export`: --to trtllm writes the TensorRT-LLM checkpoint; --to hf a transformers
    directory that TensorRT-LLM's LLM API and vLLM load directly."""
    ensure_valid(cfg, validate, what="the export config")
    if cfg.to == "trtllm":
        return export_trtllm(cfg)
    if cfg.to == "hf":
        from kiln.conversion.convert import ConvertConfig, convert

        return convert(ConvertConfig(source=cfg.source, output=cfg.output, to="hf", dtype=cfg.dtype,
                                     verify=cfg.verify, tokenizer=cfg.tokenizer))
    raise ConfigError(f"--to {cfg.to}: choose trtllm or hf")
