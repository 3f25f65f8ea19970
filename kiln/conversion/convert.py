"""`kiln convert`: HF <-> Megatron <-> .nemo, tensor by tensor, verified by logits.

The formats are kiln.conversion.source's; this is the stage. Writers pull one layer of one
tensor at a time, so memory stays at a layer's worth whatever the model size. Output lands in
`<output>.tmp-<id>` and is renamed only after the parity check passes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from kiln.artifact import atomic_dir, checkpoint_name, checkpoints_dir, mark_latest, write_manifest
from kiln.bootstrap import interactive
from kiln.config import ConvertConfig
from kiln.conversion import hf, megatron, nemo
from kiln.conversion.layerwise import HFSide, MegatronSide, compare_layers, compare_tensors
from kiln.conversion.source import (
    DTYPES,
    Model,
    common_state,
    megatron_chunks,
    open_source,
    parameter_count,
    total_bytes,
    untied,
    write_hf,
)
from kiln.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens
from kiln.errors import ConfigError
from kiln.validation import Check, Problems, check_inputs, check_output_dir, check_ranges, ensure_valid

VERIFY_DEFAULT_MAX_PARAMS = 2_000_000_000  # above this, --verify must be asked for (it loads both models)


def validate(cfg: ConvertConfig, check: Check, problems: Problems) -> None:
    check_ranges(cfg, problems)
    check_inputs("source", cfg.source, "an HF directory, a kiln run or checkpoint directory, a NeMo 2 directory "
                 "or a .nemo file", check, problems)
    out = Path(cfg.output or "")
    if cfg.to == "nemo":
        if out.suffix != ".nemo":
            problems.add(f"output={cfg.output!r}: a .nemo archive's name ends in .nemo")
        elif out.is_dir():
            problems.add(f"output={cfg.output} is an existing directory; a .nemo archive is a file: choose "
                         f"another name")
        check_output_dir("output (its directory)", str(out.parent), problems)
    else:
        check_output_dir("output", cfg.output, problems)


def convert(cfg: ConvertConfig) -> dict:
    ensure_valid(cfg, validate, what="the convert config")
    started = time.time()
    source = Path(cfg.source)
    model = open_source(source, cfg.tp, cfg.tokenizer)
    if model.config.moe is not None and cfg.to in ("nemo", "nemo2"):
        raise ConfigError(f"to={cfg.to!r}: {model.describe} is a mixture of experts, which kiln converts between "
                          f"Hugging Face and kiln's Megatron checkpoints only; use to=megatron or to=hf")
    dtype = DTYPES[cfg.dtype] if cfg.dtype else model.dtype
    n_params = parameter_count(model)
    logits_check = cfg.verify if cfg.verify is not None else n_params < VERIFY_DEFAULT_MAX_PARAMS
    out = Path(cfg.output)
    tokenizer = model.tokenizer
    staging = out.with_name(out.name + ".staging") if cfg.to == "nemo" else out
    with _progress(total_bytes(model, dtype), f"{model.describe} -> {cfg.to}") as advance, \
            atomic_dir(staging) as tmp:
        if cfg.to == "hf":
            write_hf(model, tmp, dtype, int(cfg.max_shard_gb * 1024**3), advance)
        elif cfg.to == "megatron":
            copied = hf.copy_tokenizer(tokenizer, _mkdir(tmp / "tokenizer"))
            tok = str(out / "tokenizer") if copied else tokenizer
            ckpt_dir = Path(checkpoints_dir(tmp))
            megatron.write(ckpt_dir / checkpoint_name(0), megatron_chunks(model, "", dtype, advance),
                           common_state(model, tok))
            mark_latest(ckpt_dir, checkpoint_name(0))
        elif cfg.to == "nemo2":  # NeMo's Qwen2/Mistral importers untie, and their exporters need the output layer
            nemo_model = untied(model) if model.model_type in nemo.UNTIED_FAMILIES else model
            chunks = megatron_chunks(nemo_model, nemo.NEMO2_PREFIX, dtype, advance, unpadded=True)
            nemo.write_nemo2(tmp, nemo_model, chunks, common_state(nemo_model, None), model.config.vocab_size,
                             str(dtype).removeprefix("torch."))
        else:
            nemo.write_nemo_archive(tmp, model, megatron_chunks(model, nemo.NEMO1_PREFIX, dtype, advance),
                                    common_state(model, None))
        layers = _verify_layers(model, source, tmp, cfg.to) if cfg.verify is not False else None
        delta = _verify(model, tmp, cfg.to) if logits_check else None
        summary = {"source": str(source), "to": cfg.to, "parameters": n_params, "dtype": str(dtype),
                   "max_abs_logit_delta": delta, "layer_max_abs_delta": layers, "verified": layers is not None,
                   "seconds": round(time.time() - started, 2)}
        if cfg.to == "nemo":  # the archive is the artifact; its staging directory goes
            os.replace(tmp / nemo.ARCHIVE_NAME, out)
        else:
            write_manifest(tmp, "convert", dataclasses.asdict(cfg), [cfg.source], summary, started)
    if cfg.to == "nemo":
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _verify(source: Model, out: Path, to: str) -> float:
    """Logits of the source and of what was written, on the same tokens."""
    tokens = sample_tokens(source.config.vocab_size)
    if source.describe.startswith("HF "):
        reference = hf_logits(source.tokenizer, tokens)
    else:
        reference = megatron_logits(source.read, source.config, tokens)
    if to == "hf":
        candidate = hf_logits(out, tokens)
    else:
        written = open_source(_written_path(out, to), 1, None)
        candidate = megatron_logits(written.read, written.config, tokens)
    return compare(reference, candidate, f"{source.describe} vs its {to} conversion")


def _verify_layers(source: Model, source_path: Path, out: Path, to: str) -> dict[str, float]:
    """Layer by layer on the same hidden states: transformers' layers for an HF side, megatron-core's
    for a Megatron or NeMo side; between two Megatron-layout sides (one engine) every tensor of
    each layer is compared instead. {point: max |delta|} for the manifest."""
    written = None if to == "hf" else open_source(_written_path(out, to), 1, None)
    what = f"{source.describe} vs its {to} conversion"
    if written is not None and not source.describe.startswith("HF "):
        return compare_tensors(source, written, what)
    tokens = sample_tokens(source.config.vocab_size)
    hf_dir = source_path if written is not None else out
    engine = MegatronSide(*((written.read, written.config) if written is not None else (source.read, source.config)))
    try:
        sides = (HFSide(hf_dir), engine) if written is not None else (engine, HFSide(hf_dir))
        return compare_layers(*sides, tokens, what)
    finally:
        engine.close()


def _written_path(out: Path, to: str) -> Path:
    return {"megatron": out, "nemo2": out, "nemo": out / nemo.ARCHIVE_NAME}[to]


class _progress:
    """A rich progress bar over bytes written, with throughput; silent when not a terminal."""

    def __init__(self, total: int, description: str):
        self.total, self.description = total, description

    def __enter__(self):
        import sys

        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), disable=not interactive(sys.stderr))
        self._progress.start()
        task = self._progress.add_task(self.description, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc):
        self._progress.stop()
        return False
