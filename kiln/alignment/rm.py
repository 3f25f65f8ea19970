"""`kiln rm`: a reward model, the GPT with a scalar head instead of its vocabulary projection,
trained on preference pairs with the Bradley-Terry loss. The head is `output_layer`, so a
base checkpoint loads as is (the head starts fresh); RLHF scores completions with the saved checkpoint.
"""

from __future__ import annotations

import copy

import torch

from kiln.artifact import write_manifest
from kiln.config import RMConfig
from kiln.data.gpt_dataset import BatchOrder
from kiln.data.preference import PreferenceDataset, load_pairs
from kiln.training import loop
from kiln.training.engine import build_engine
from kiln.training.pretrain import run_ranks

HEAD_KEY = "output_layer.weight"  # megatron-core expects the key; here it is [1, hidden]


class ScalarHead(torch.nn.Module):
    """Replaces GPTModel.output_layer: hidden [s, b, h] -> one value per position [s, b, 1].
    Replicated over TP (its input, the final norm's output, is whole on every TP rank)."""

    def __init__(self, hidden: int, std: float, device, dtype):
        super().__init__()
        init = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)) * std
        self.weight = torch.nn.Parameter(init.to(device, dtype))

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        return hidden @ self.weight.t().to(hidden.dtype), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets)


def with_scalar_head(cfg):
    """The config a scalar-head model is built from (untied: the head replaces the projection)
    and the transform that swaps the head in."""
    cfg = copy.deepcopy(cfg)
    cfg.model.tie_embeddings = False

    def transform(gpt):
        if gpt.post_process:
            gpt.output_layer = ScalarHead(cfg.model.hidden_size, cfg.model.init_method_std,
                                          gpt.embedding.word_embeddings.weight.device
                                          if gpt.pre_process else next(gpt.parameters()).device,
                                          next(gpt.parameters()).dtype)

    return cfg, transform


def is_head(key: str) -> bool:
    return key.startswith(HEAD_KEY)


def last_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the last position whose next token is part of the answer: the score is read there."""
    positions = torch.arange(loss_mask.size(1), device=loss_mask.device)
    return (positions * (loss_mask > 0)).argmax(-1)


def scores(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """values [b, s, 1] -> one scalar per row."""
    rows = torch.arange(values.size(0), device=values.device)
    return values[rows, last_positions(loss_mask), 0].float()


def rm_forward_step(batch: dict, model):
    output = model(batch["tokens"], batch["position_ids"], None)

    def loss_func(values):
        from kiln.alignment.losses import bradley_terry_loss

        r = scores(values, batch["loss_mask"])
        m = r.size(0) // 2
        losses = bradley_terry_loss(r[:m], r[m:])
        pairs = torch.tensor(float(m), device=r.device)
        total = losses.sum()
        report = {"loss": torch.stack([total.detach(), pairs]),
                  "accuracy": torch.stack([(r[:m] > r[m:]).float().sum(), pairs]),
                  "margin": torch.stack([(r[:m] - r[m:]).detach().sum(), pairs])}
        return total, pairs.to(torch.int), report

    return output, loss_func


def rm(cfg: RMConfig) -> dict:
    return run_ranks(cfg, _train)


def _train(cfg: RMConfig, rank: int, world: int, device, started: float, request: RMConfig) -> dict:
    train_ds = load_pairs(cfg, cfg.data.train, rank, "train")
    valid_ds = load_pairs(cfg, cfg.data.valid, rank, "valid") if cfg.data.valid else None
    cfg, transform = with_scalar_head(cfg)
    engine = build_engine(cfg, device, transform)
    t = cfg.train
    order = BatchOrder(t.micro_batch_size, t.global_batch_size, engine.dp_rank, engine.dp_size)
    count = cfg.num_microbatches(world)

    def batches(dataset: PreferenceDataset):
        return lambda step: iter([dataset.batch([dataset.index(i) for i in order.indices(step, m)], device)
                                  for m in range(count)])

    task = loop.Task(
        name="rm", batches=batches(train_ds), valid_batches=batches(valid_ds) if valid_ds is not None else None,
        forward_step=rm_forward_step, tokens_per_step=2 * t.global_batch_size * t.seq_length, rows_per_sample=2,
        report_names=("loss", "accuracy", "margin"), tokenizer=cfg.data.tokenizer,
        describe=" | reward model (scalar head, Bradley-Terry)", new_keys=is_head,
    )
    summary = loop.train(cfg, engine, task, rank, world, device)
    if rank == 0 and "steps" in summary:
        write_manifest(cfg.run_dir, "rm", cfg, loop.manifest_inputs(cfg), summary, started, request=request)
    return summary
