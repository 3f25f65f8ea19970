"""`kiln sft`: supervised fine-tuning on chat data, full or LoRA, on the pretraining engine.

Same loop as pretraining (resume, preemption, checkpoints, validation); what differs is the
data (chat-templated, assistant-only loss, packed) and, with LoRA, a frozen base whose
checkpoints hold only the adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln import overrides
from kiln.artifact import atomic_dir, write_manifest
from kiln.config import SFTConfig
from kiln.data import sft as sft_data
from kiln.data.chat import ChatFormatter
from kiln.data.gpt_dataset import BatchOrder
from kiln.data.records import DataReport
from kiln.data.tokenizer import eod_id, load
from kiln.training import checkpoint as ckpt
from kiln.training import loop
from kiln.training.engine import build_engine, eval_step, lm_loss
from kiln.training.layers import transformer_engine_available
from kiln.training.model import attend_within_mask
from kiln.training.pretrain import run_ranks


def sft(cfg: SFTConfig) -> dict:
    return run_ranks(cfg, _train)


def is_adapter(key: str) -> bool:
    from kiln.alignment.lora import ADAPTER_SUFFIX

    return f"{ADAPTER_SUFFIX}." in key


def sft_forward_step(batch: dict, model):
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   packed_seq_params=batch.get("packed_seq_params"))
    return output, lambda out: lm_loss(out, batch["loss_mask"])


def load_datasets(cfg: SFTConfig, rank: int):
    """(train, valid or None, report): every rank encodes the same records the same way."""
    d, seq = cfg.data, cfg.train.seq_length
    tokenizer = load(d.tokenizer)
    formatter = ChatFormatter(tokenizer, d.chat_template)
    datasets, reports = [], {}
    for split in ("train", "valid"):
        path = getattr(d, split)
        if not path:
            datasets.append(None)
            continue
        report = DataReport()
        examples = sft_data.encode_file(path, formatter, seq, report, d.strict)
        samples = sft_data.pack(examples, seq) if d.packing else [[e] for e in examples]
        datasets.append(sft_data.SFTDataset(samples, seq, eod_id(tokenizer), cfg.train.seed))
        reports[split] = {**report.to_dict(), "samples": len(samples)}
        if rank == 0:
            print(f"data.{split} {path}: {report.summary()}; {len(examples)} examples in {len(samples)} "
                  f"sequences of {seq}{' (packed)' if d.packing else ''}", flush=True)
            for line in report.examples[:5]:
                print(f"  {line}", flush=True)
    return datasets[0], datasets[1], reports


def _train(cfg: SFTConfig, rank: int, world: int, device, started: float, request: SFTConfig) -> dict:
    from kiln.alignment import lora

    train_ds, valid_ds, reports = load_datasets(cfg, rank)
    adapted = cfg.lora.enabled
    thd = device.type == "cuda" and transformer_engine_available()  # TE takes packed sequences as THD

    def transform(gpt):
        if cfg.data.packing and not thd:
            attend_within_mask(gpt)
        if adapted:
            lora.apply_lora(gpt, cfg.lora, cfg.train.seed)

    engine = build_engine(cfg, device, transform)
    t = cfg.train
    order = BatchOrder(t.micro_batch_size, t.global_batch_size, engine.dp_rank, engine.dp_size)
    count = cfg.num_microbatches(world)

    def batches(dataset):
        return lambda step: sft_data.microbatches(dataset, order, step, count, device, cfg.data.packing, thd)

    task = loop.Task(
        name="sft",
        batches=batches(train_ds),
        valid_batches=batches(valid_ds) if valid_ds is not None else None,
        forward_step=sft_forward_step,
        tokens_per_step=t.global_batch_size * t.seq_length,
        tokenizer=cfg.data.tokenizer,
        describe=f" | LoRA r={cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}" if adapted else "",
        new_keys=is_adapter if adapted else None,
        adapter_only=adapted,
    )
    summary = loop.train(cfg, engine, task, rank, world, device)
    if "steps" not in summary:
        return summary
    summary["data"] = reports
    if adapted and not summary.get("eval_only"):
        summary["adapter"] = str(export_adapter(cfg, engine, rank))
        if cfg.lora.merge:
            summary.update(merge_and_save(cfg, engine, task, summary["steps"]))
    if rank == 0:
        write_manifest(cfg.run_dir, "sft", cfg, loop.manifest_inputs(cfg), summary, started, request=request)
    return summary


def merge_and_save(cfg: SFTConfig, engine, task: loop.Task, step: int) -> dict:
    """Fold the adapters into the base weights and write <run_dir>/merged, a plain checkpoint.
    The same batch's loss before and after the merge is recorded: they must agree."""
    from kiln.alignment import lora

    def probe() -> float:
        t = cfg.train
        return eval_step(engine, lambda: task.batches(0), cfg.num_microbatches(torch.distributed.get_world_size()),
                         t.seq_length, t.micro_batch_size, task.forward_step)["loss"]

    before = probe()
    lora.merge(engine.chunks)
    after = probe()
    state = {"model": overrides.to_dict(cfg.model), "tokenizer": str(Path(cfg.data.tokenizer).resolve())}
    path = ckpt.save_weights(Path(cfg.run_dir) / "merged", step, engine.chunks, state, skip=is_adapter)
    return {"merged": str(path), "merge_loss_before": before, "merge_loss_after": after}


def export_adapter(cfg: SFTConfig, engine, rank: int) -> Path:
    """<run_dir>/adapter: adapter.safetensors with whole (unsharded) tensors named by global
    layer, and adapter_config.json. Independent of the TP/PP layout that trained it."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from kiln.alignment import lora

    mine = {}
    for path, (_base, adapter) in lora.adapters(engine.chunks).items():
        for pname in ("lora_a", "lora_b"):
            mine[f"{path}.{pname}"] = (getattr(adapter, pname).detach().cpu(), adapter.kind, adapter.glu)
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, (ps.get_tensor_model_parallel_rank(), mine))
    out = Path(cfg.run_dir) / "adapter"
    if rank == 0:
        tensors = _assemble(shards, ps.get_tensor_model_parallel_world_size())
        config = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules,
                  "base": cfg.checkpoint.load_weights, "model": overrides.to_dict(cfg.model),
                  "format": "kiln-lora-v1: W' = W + alpha/rank * lora_b @ lora_a, megatron-core weight names"}
        with atomic_dir(out) as tmp:
            save_file(tensors, str(tmp / "adapter.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.distributed.barrier()
    return out


def _assemble(shards: list, tp: int) -> dict[str, torch.Tensor]:
    """Whole tensors from every TP rank's slice (DP replicas give the same slice twice)."""
    pieces: dict[str, dict[int, tuple]] = {}
    for tp_rank, tensors in shards:
        for key, value in tensors.items():
            pieces.setdefault(key, {})[tp_rank] = value
    whole = {}
    for key, by_rank in pieces.items():
        parts = [by_rank[r][0] for r in range(len(by_rank))]
        _, kind, glu = by_rank[0]
        is_b, is_a = key.endswith("lora_b"), key.endswith("lora_a")
        if kind == "column" and is_b and glu and tp > 1:  # [gate_r; up_r] per rank -> [gate; up]
            halves = [p.chunk(2) for p in parts]
            whole[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves]).contiguous()
        elif kind == "column" and is_b:
            whole[key] = torch.cat(parts).contiguous()
        elif kind == "row" and is_a:
            whole[key] = torch.cat(parts, dim=1).contiguous()
        else:
            whole[key] = parts[0].contiguous()
    return whole
