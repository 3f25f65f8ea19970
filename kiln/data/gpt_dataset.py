"""Pretraining data: megatron-core GPTDatasets (weighted blends, train/valid split) and the
deterministic order in which ranks read them.

Sample `i` of the run is the same sample whatever the DP size, so a resumed or
resharded run reads exactly what an uninterrupted one would: the data position is
just the number of samples consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.config import DataConfig, TrainConfig


def blend(data: DataConfig) -> tuple[list[str], list[float] | None]:
    """[prefix] or [w1, prefix1, w2, prefix2, ...] -> (prefixes, weights)."""
    items = list(data.blend)
    if len(items) == 1:
        return [str(items[0])], None
    if len(items) % 2:
        raise ValueError(
            f"data.blend has {len(items)} items: give one prefix, or weight/prefix pairs "
            f"such as [0.7, data/a_text_document, 0.3, data/b_text_document]"
        )
    weights = [float(w) for w in items[0::2]]
    return [str(p) for p in items[1::2]], weights


def check_prefixes(prefixes: list[str]) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).exists():
                raise FileNotFoundError(
                    f"data.blend: {prefix}{suffix} does not exist; a prefix is the indexed dataset "
                    f"path without .bin/.idx, as written by `kiln prepare`"
                )


def build_datasets(data: DataConfig, train: TrainConfig, tokenizer, cache_dir: str):
    """(train, valid) megatron-core datasets, sized for the whole run."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    config = GPTDatasetConfig(
        random_seed=train.seed,
        sequence_length=train.seq_length,
        blend=None if data.mock else blend(data),
        split=data.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal masking happens inside attention
        path_to_cache=cache_dir,
    )
    if not data.mock:
        check_prefixes(config.blend[0])
    evals = (train.steps // train.eval_interval + 1) * train.eval_steps if train.eval_interval else 0
    sizes = [train.steps * train.global_batch_size, evals * train.global_batch_size, 0]
    cls = MockGPTDataset if data.mock else GPTDataset
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return train_ds, valid_ds


@dataclass
class BatchOrder:
    """Which samples this DP rank reads for each microbatch of each step."""

    micro_batch_size: int
    global_batch_size: int
    dp_rank: int
    dp_size: int

    def indices(self, step: int, microbatch: int) -> range:
        """Megatron's order: a step's global batch is consecutive samples; each microbatch
        window of micro_batch_size x DP samples is split between DP ranks."""
        window = self.micro_batch_size * self.dp_size
        start = step * self.global_batch_size + microbatch * window + self.dp_rank * self.micro_batch_size
        return range(start, start + self.micro_batch_size)


def microbatches(dataset, order: BatchOrder, step: int, count: int, device: torch.device):
    """The `count` microbatches of `step` for this rank, as dicts of stacked tensors."""
    for m in range(count):
        samples = [dataset[i] for i in order.indices(step, m)]
        yield {
            key: torch.stack([s[key] for s in samples]).to(device, non_blocking=True)
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
