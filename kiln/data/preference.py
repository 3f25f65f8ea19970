"""Preference pairs for DPO and reward models: {prompt, chosen, rejected}, each a string or a
list of messages, rendered with the chat template into two sequences that share the prompt.

A microbatch holds its pairs' chosen sequences first, then their rejected ones: [2m, S].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.data.chat import ChatFormatter, TemplateError
from kiln.data.records import DataReport, RecordError, messages_of, read_jsonl
from kiln.data.sft import Example, build_sample


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def _conversation(prompt, answer) -> list[dict]:
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    reply = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
    return messages_of({"messages": [*turns, *reply]})


def encode_pairs(path: str, formatter: ChatFormatter, seq_length: int, report: DataReport,
                 strict: bool) -> list[Pair]:
    pairs = []
    for where, record in read_jsonl(path, report, strict):
        try:
            if not all(k in record for k in ("prompt", "chosen", "rejected")):
                raise RecordError("expected 'prompt', 'chosen' and 'rejected'")
            if record["chosen"] == record["rejected"]:
                raise RecordError("'chosen' equals 'rejected': the pair expresses no preference")
            sides = [formatter.encode(_conversation(record["prompt"], record[k])) for k in ("chosen", "rejected")]
        except (RecordError, TemplateError) as exc:
            kind = "chosen_equals_rejected" if "equals" in str(exc) else "invalid"
            report.drop(where, str(exc), kind, strict)
            continue
        examples = []
        for side in sides:
            tokens, mask = side.tokens[: seq_length + 1], side.loss_mask[: seq_length + 1]
            examples.append(Example(tokens, mask))
        if not all(any(e.loss_mask[1:]) for e in examples):
            report.drop(where, f"the prompt alone fills train.seq_length={seq_length} tokens; raise "
                        f"train.seq_length or shorten it", "prompt_too_long", strict)
            continue
        if any(len(s.tokens) > seq_length + 1 for s in sides):
            report.truncated += 1
        report.kept += 1
        pairs.append(Pair(*examples))
    return pairs


class PreferenceDataset:
    """Pair i of the run is pair i mod n, in a per-epoch seeded order (as SFTDataset)."""

    def __init__(self, pairs: list[Pair], seq_length: int, pad_id: int, seed: int):
        if not pairs:
            raise ValueError("the preference dataset is empty after filtering: see the data report above")
        self.pairs, self.seq_length, self.pad_id, self.seed = pairs, seq_length, pad_id, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def index(self, i: int) -> int:
        import numpy as np

        epoch, j = divmod(i, len(self.pairs))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))[j])

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Pairs by dataset index -> [chosen..., rejected...] rows, plus `index` for caches."""
        rows = [build_sample([self.pairs[i].chosen], self.seq_length, self.pad_id) for i in indices]
        rows += [build_sample([self.pairs[i].rejected], self.seq_length, self.pad_id) for i in indices]
        batch = {key: torch.stack([r[key] for r in rows]).to(device)
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["index"] = torch.tensor(indices, device=device)
        return batch


def load_pairs(cfg, path: str, rank: int, split: str) -> PreferenceDataset:
    from kiln.data.tokenizer import eod_id, load

    tokenizer = load(cfg.data.tokenizer)
    report = DataReport()
    pairs = encode_pairs(path, ChatFormatter(tokenizer, cfg.data.chat_template), cfg.train.seq_length, report,
                         cfg.data.strict)
    if rank == 0:
        print(f"data.{split} {path}: {report.summary()}", flush=True)
        for line in report.examples[:5]:
            print(f"  {line}", flush=True)
    dataset = PreferenceDataset(pairs, cfg.train.seq_length, eod_id(tokenizer), cfg.train.seed)
    dataset.report = report
    return dataset
