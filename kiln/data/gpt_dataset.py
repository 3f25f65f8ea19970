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


def source_names(prefixes: list[str]) -> list[str]:
    """Metric names for blend sources: each prefix's basename without kiln prepare's
    `_text_document` suffix; a repeated name gets _2, _3, ... in blend order."""
    names: list[str] = []
    for prefix in prefixes:
        base = Path(prefix).name.removesuffix("_text_document") or Path(prefix).name
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def valid_samples(train: TrainConfig) -> int:
    """Every validation round reads the same held-out samples: eval_steps global batches."""
    return train.eval_steps * train.global_batch_size


def build_datasets(data: DataConfig, train: TrainConfig, tokenizer, cache_dir: str):
    """(train or None, {source name: valid dataset}) as megatron-core datasets.

    Train is the blend (megatron-core's BlendedDataset), sized for the whole run; none for an
    eval-only run (train.steps=0). Validation is one GPTDataset per blend source: the valid split
    of that prefix alone, built exactly as a run with data.blend=[prefix] builds it, so a source
    scores the same in any blend."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    def config(prefixes_weights):
        return GPTDatasetConfig(
            random_seed=train.seed,
            sequence_length=train.seq_length,
            blend=prefixes_weights,
            split=data.split,
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,  # causal masking happens inside attention
            path_to_cache=cache_dir,
        )

    validates = train.eval_interval > 0 or train.steps == 0
    n_valid = valid_samples(train) if validates else 0
    if data.mock:
        sizes = [train.steps * train.global_batch_size, n_valid, 0]
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True,
                                                              config(None)).build()
        return train_ds if train.steps else None, {"mock": valid_ds} if validates else {}
    prefixes, weights = blend(data)
    check_prefixes(prefixes)
    train_ds = None
    if train.steps:
        sizes = [train.steps * train.global_batch_size, 0, 0]
        train_ds = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                 config((prefixes, weights))).build()[0]
    valid = {}
    if validates:
        for name, prefix in zip(source_names(prefixes), prefixes, strict=True):
            valid[name] = BlendedMegatronDatasetBuilder(GPTDataset, [0, n_valid, 0], lambda: True,
                                                        config(([prefix], None))).build()[1]
    return train_ds, valid


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
