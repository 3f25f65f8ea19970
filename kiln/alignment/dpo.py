"""`kiln dpo`: direct preference optimisation on the engine, against a frozen reference.

The reference is the model at `checkpoint.load_weights`. `dpo.reference=cached` computes its
log-probabilities for every pair once, before training, with the same pipeline schedule
(TP/PP/DP), and keeps them in <run_dir>/reference_logps.pt (reused on resume); `online`
keeps a frozen copy of the model and runs it on each step's microbatches.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from kiln.artifact import atomic_write_bytes, write_manifest
from kiln.config import DPOConfig
from kiln.data.gpt_dataset import BatchOrder
from kiln.data.preference import PreferenceDataset, load_pairs
from kiln.training import checkpoint as ckpt
from kiln.training import loop
from kiln.training.engine import build_engine, run_schedule
from kiln.training.model import build_model, resolve_precision
from kiln.training.pretrain import run_ranks
from kiln.validation import Check, Problems, ensure_valid

REPORTS = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected")


def dpo(cfg: DPOConfig) -> dict:
    return run_ranks(cfg, _train)


def sequence_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens (GPTModel returns -log p per token)."""
    return -(per_token_loss.float() * loss_mask).sum(-1)


def logps_forward_step(batch: dict, model):
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def collect(out):
        return out.sum() * 0, torch.tensor(1), {"logps": sequence_logps(out, batch["loss_mask"]).detach(),
                                                "index": batch["index"]}

    return output, collect


class Reference:
    """Reference log-probabilities [pairs, (chosen, rejected)] by dataset index."""

    def __init__(self, cfg: DPOConfig, device):
        self.cfg, self.device = cfg, device
        self._chunks = None

    def model(self) -> list:
        if self._chunks is None:
            chunks, _ = build_model(self.cfg.model, self.cfg.parallel, resolve_precision(self.cfg.train.precision),
                                    self.device, False)
            ckpt.load(self.cfg.checkpoint.load_weights, chunks)
            for chunk in chunks:
                chunk.eval()
                chunk.requires_grad_(False)
            self._chunks = chunks
        return self._chunks

    def run(self, batches: list[dict]) -> list[torch.Tensor | None]:
        """[m, 2] per microbatch on the ranks that compute losses (last stage), None elsewhere."""
        t = self.cfg.train
        chunks = self.model()  # built outside no_grad: megatron DDP hooks need autograd
        with torch.no_grad():
            reports = run_schedule(chunks, lambda: iter(batches), len(batches), t.seq_length,
                                   2 * t.micro_batch_size, logps_forward_step, forward_only=True)
        if not reports:
            return [None] * len(batches)
        return [r["logps"].view(2, -1).t() for r in reports]

    def table(self, dataset: PreferenceDataset, dp_rank: int, dp_size: int) -> torch.Tensor:
        """Every pair's reference log-probs, on every rank: each DP replica scores a share, then
        one all-reduce over the world (only the loss-computing rank of each replica adds)."""
        from megatron.core import parallel_state as ps

        mbs, n = self.cfg.train.micro_batch_size, len(dataset)
        windows = -(-n // (mbs * dp_size))
        indices = [[(w * mbs * dp_size + dp_rank * mbs + k) % n for k in range(mbs)] for w in range(windows)]
        refs = self.run([dataset.batch(i, self.device) for i in indices])
        table = torch.zeros(n, 2, dtype=torch.float64, device=self.device)
        seen = torch.zeros(n, dtype=torch.float64, device=self.device)
        if ps.get_tensor_model_parallel_rank() == 0 and refs[0] is not None:
            for idx, ref in zip(indices, refs, strict=True):
                table[idx] = ref.to(table)
                seen[idx] = 1.0
        torch.distributed.all_reduce(table)
        torch.distributed.all_reduce(seen)
        return (table / seen.clamp(min=1)[:, None]).float()

    def release(self) -> None:
        self._chunks = None


def cached_table(cfg: DPOConfig, reference: Reference, dataset, path: str, split: str, engine) -> torch.Tensor:
    """The reference table for `dataset`, from <run_dir>/reference_logps_<split>.pt when it was
    computed for the same data and reference weights, else computed now and saved."""
    digest = hashlib.sha256(f"{Path(path).resolve()}:{Path(path).stat().st_mtime_ns}:"
                            f"{ckpt.resolve(cfg.checkpoint.load_weights)}:{cfg.train.seq_length}".encode()).hexdigest()
    cache = Path(cfg.run_dir) / f"reference_logps_{split}.pt"
    if cache.exists():
        saved = torch.load(cache, map_location=reference.device, weights_only=True)  # tensors and a str only
        if saved["digest"] == digest:
            return saved["logps"]
    table = reference.table(dataset, engine.dp_rank, engine.dp_size)
    if torch.distributed.get_rank() == 0:
        buffer = io.BytesIO()
        torch.save({"digest": digest, "logps": table.cpu()}, buffer)
        atomic_write_bytes(cache, buffer.getvalue())
    torch.distributed.barrier()
    return table


def dpo_forward_step(cfg: DPOConfig):
    from kiln.alignment.losses import dpo_loss

    def forward_step(batch: dict, model):
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token):
            mask = batch["loss_mask"]
            m = mask.size(0) // 2
            logps, counts = sequence_logps(per_token, mask), mask.sum(-1)
            ref = batch["ref"]
            losses, chosen, rejected = dpo_loss(logps[:m], logps[m:], ref[:, 0], ref[:, 1], cfg.dpo,
                                                counts[:m], counts[m:])
            total = losses.sum()
            if cfg.dpo.rpo_alpha:  # RPO: NLL of the chosen answer, per token, added per pair
                total = total + cfg.dpo.rpo_alpha * ((per_token[:m].float() * mask[:m]).sum(-1)
                                                     / counts[:m].clamp(min=1)).sum()
            pairs = torch.tensor(float(m), device=total.device)

            def mean(x):
                return torch.stack([x.detach().float().sum(), pairs])

            report = {"loss": mean(total.reshape(1)), "accuracy": mean((chosen > rejected).float()),
                      "margin": mean(chosen - rejected), "reward_chosen": mean(chosen),
                      "reward_rejected": mean(rejected)}
            return total, pairs.to(torch.int), report

        return output, loss_func

    return forward_step


def validate(cfg: DPOConfig, check: Check, problems: Problems) -> None:
    if not cfg.checkpoint.load_weights:
        problems.add("checkpoint.load_weights is unset: DPO starts from (and is regularised towards) a trained "
                     "model; give its checkpoint directory (e.g. the SFT run's checkpoints)")
    d = cfg.dpo
    if d.label_smoothing and d.loss_type != "sigmoid":
        problems.add(f"dpo.label_smoothing={d.label_smoothing} applies to the sigmoid loss only: set "
                     f"dpo.loss_type=sigmoid or dpo.label_smoothing=0")


def _train(cfg: DPOConfig, rank: int, world: int, device, started: float, request: DPOConfig) -> dict:
    ensure_valid(cfg, validate, check=Check(world_size=world), what="the dpo config")
    train_ds = load_pairs(cfg, cfg.data.train, rank, "train")
    valid_ds = load_pairs(cfg, cfg.data.valid, rank, "valid") if cfg.data.valid else None
    engine = build_engine(cfg, device)
    t = cfg.train
    order = BatchOrder(t.micro_batch_size, t.global_batch_size, engine.dp_rank, engine.dp_size)
    count = cfg.num_microbatches(world)
    reference = Reference(cfg, device)
    tables = {}
    if cfg.dpo.reference == "cached":
        tables["train"] = cached_table(cfg, reference, train_ds, cfg.data.train, "train", engine)
        if valid_ds is not None:
            tables["valid"] = cached_table(cfg, reference, valid_ds, cfg.data.valid, "valid", engine)
        reference.release()

    def batches(dataset: PreferenceDataset, split: str):
        def make(step: int):
            mbs = [dataset.batch([dataset.index(i) for i in order.indices(step, m)], device) for m in range(count)]
            if split in tables:
                refs = [tables[split][mb["index"]] for mb in mbs]
            else:
                refs = reference.run(mbs)
            for mb, ref in zip(mbs, refs, strict=True):
                mb["ref"] = ref
            return iter(mbs)

        return make

    task = loop.Task(
        name="dpo",
        batches=batches(train_ds, "train"),
        valid_batches=batches(valid_ds, "valid") if valid_ds is not None else None,
        forward_step=dpo_forward_step(cfg),
        tokens_per_step=2 * t.global_batch_size * t.seq_length,
        rows_per_sample=2,
        report_names=REPORTS,
        tokenizer=cfg.data.tokenizer,
        describe=f" | DPO {cfg.dpo.loss_type} beta={cfg.dpo.beta}, {cfg.dpo.reference} reference",
    )
    summary = loop.train(cfg, engine, task, rank, world, device)
    if rank == 0 and "steps" in summary:
        summary["data"] = {"train": train_ds.report.to_dict(), **({"valid": valid_ds.report.to_dict()}
                                                                    if valid_ds is not None else {})}
        write_manifest(cfg.run_dir, "dpo", cfg, loop.manifest_inputs(cfg), summary, started, request=request)
    return summary
