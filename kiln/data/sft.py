"""SFT data: conversations -> token sequences with an assistant-only loss mask, packed or padded
into fixed-length samples, read in a deterministic order shared with pretraining.

Packing puts several examples in one sample (first-fit-decreasing). Attention must not cross
examples and positions restart per example: on CPU (local attention) a block-diagonal causal
mask does it; with TransformerEngine the same segments become THD packed-sequence params
(cu_seqlens), so no S x S mask is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.data.chat import ChatFormatter, TemplateError
from kiln.data.records import DataReport, RecordError, messages_of, read_jsonl


@dataclass
class Example:
    tokens: list[int]
    loss_mask: list[int]

    @property
    def positions(self) -> int:  # predictions it holds: tokens[1:] from tokens[:-1]
        return len(self.tokens) - 1


def encode_file(path: str, formatter: ChatFormatter, seq_length: int, report: DataReport,
                strict: bool) -> list[Example]:
    """Every usable record of `path`, encoded and cut to seq_length predictions."""
    examples = []
    for where, record in read_jsonl(path, report, strict):
        try:
            encoded = formatter.encode(messages_of(record))
        except (RecordError, TemplateError) as exc:
            report.drop(where, str(exc), "invalid", strict)
            continue
        tokens, mask = encoded.tokens, encoded.loss_mask
        if len(tokens) > seq_length + 1:
            tokens, mask = tokens[: seq_length + 1], mask[: seq_length + 1]
            if not any(mask[1:]):
                report.drop(where, f"the prompt alone fills data.seq_length={seq_length} tokens; "
                            f"raise train.seq_length or shorten it", "prompt_too_long", strict)
                continue
            report.truncated += 1
        report.kept += 1
        examples.append(Example(tokens, mask))
    return examples


def pack(examples: list[Example], seq_length: int) -> list[list[Example]]:
    """First-fit-decreasing: longest first, each into the first sample with room. Deterministic
    (stable sort); the result is shuffled by the sampler, not here."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i].positions)
    bins: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        need = examples[i].positions
        for b, free in enumerate(room):
            if need <= free:
                bins[b].append(examples[i])
                room[b] -= need
                break
        else:
            bins.append([examples[i]])
            room.append(seq_length - need)
    return bins


def build_sample(examples: list[Example], seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One fixed-length sample: inputs, next-token labels, loss mask, restarting positions and
    the segment lengths (the padding tail is a segment of its own)."""
    tokens, labels, mask, positions, segments = [], [], [], [], []
    for ex in examples:
        n = ex.positions
        tokens += ex.tokens[:-1]
        labels += ex.tokens[1:]
        mask += ex.loss_mask[1:]
        positions += range(n)
        segments.append(n)
    pad = seq_length - len(tokens)
    if pad:
        tokens += [pad_id] * pad
        labels += [pad_id] * pad
        mask += [0] * pad
        positions += range(pad)
        segments.append(pad)
    return {
        "tokens": torch.tensor(tokens), "labels": torch.tensor(labels),
        "loss_mask": torch.tensor(mask, dtype=torch.float32), "position_ids": torch.tensor(positions),
        "segments": torch.tensor(segments),
    }


def block_causal_mask(segments: list[torch.Tensor], seq_length: int) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is NOT allowed (megatron-core's convention):
    causal within a segment, nothing across segments."""
    masks = []
    for lengths in segments:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        same = ids[:, None] == ids[None, :]
        causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
        masks.append(~(same & causal))
    return torch.stack(masks).unsqueeze(1)


def packed_seq_params(segments: torch.Tensor):
    """TransformerEngine's THD form of one packed sample (micro batch 1): cumulative lengths."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.zeros(len(segments) + 1, dtype=torch.int32, device=segments.device)
    cu[1:] = torch.cumsum(segments, 0)
    longest = int(segments.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class SFTDataset:
    """Fixed-length samples; sample i of the run is sample `perm_epoch[i % n]`, reshuffled each
    epoch with the seed, so any DP size and any resume read the same sequence."""

    def __init__(self, samples: list[list[Example]], seq_length: int, pad_id: int, seed: int):
        if not samples:
            raise ValueError("the SFT dataset is empty after filtering: see the data report above")
        self.samples, self.seq_length, self.pad_id, self.seed = samples, seq_length, pad_id, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, len(self.samples))
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        return build_sample(self.samples[perm[i]], self.seq_length, self.pad_id)

    @property
    def tokens(self) -> int:
        """Predictions with loss (assistant tokens) in one pass over the data."""
        return sum(sum(e.loss_mask[1:]) for s in self.samples for e in s)


def microbatches(dataset: SFTDataset, order, step: int, count: int, device: torch.device, packed: bool,
                 thd: bool = False):
    """This rank's microbatches of `step`: stacked tensors plus the attention layout."""
    for m in range(count):
        samples = [dataset[i] for i in order.indices(step, m)]
        batch = {key: torch.stack([s[key] for s in samples]).to(device)
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["attention_mask"] = None
        if packed and thd:
            batch["packed_seq_params"] = packed_seq_params(samples[0]["segments"].to(device))
        elif packed:
            batch["attention_mask"] = block_causal_mask([s["segments"] for s in samples],
                                                        dataset.seq_length).to(device)
        yield batch
