"""Per-step observability on rank 0: a log line, metrics.jsonl, TensorBoard, a progress bar and the
experiment trackers of `logging.wandb` / `logging.mlflow` (kiln.training.trackers)."""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path

from kiln.bootstrap import interactive
from kiln.config import LoggingConfig, ModelConfig
from kiln.errors import Divergence
from kiln.training import trackers

log = logging.getLogger("kiln.train")


def flops_per_token(model: ModelConfig, seq_length: int, vocab: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting every matmul."""
    h, layers, ffn = model.hidden_size, model.num_layers, model.ffn_size
    q = model.num_attention_heads * model.head_dim
    kv = 2 * model.heads_kv * model.head_dim
    mlp_in = ffn * (2 if model.activation == "swiglu" else 1)
    per_layer = 2 * h * (q + kv) + 2 * q * h + 2 * h * mlp_in + 2 * ffn * h
    attention = 2 * 2 * seq_length * q  # scores and weighted values, full (not causal-halved)
    return 3 * (layers * (per_layer + attention) + 2 * h * vocab)


class MetricsLogger:
    def __init__(self, run_dir: str, cfg: LoggingConfig, total_steps: int, enabled: bool,
                 resumed: bool = True, config=None):
        """`config`: the stage's whole config, for the experiment trackers (they log it)."""
        self.cfg = cfg
        self.enabled = enabled
        self.recent = deque(maxlen=20)
        self._jsonl = self._tb = self._progress = None
        self._trackers: list = []
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        # a resumed run continues the file; a new run in an old directory starts it afresh
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a" if resumed else "w", buffering=1)
        if config is not None:  # the same choice as metrics.jsonl: continue the tracker runs, or start new ones
            self._trackers = trackers.open_run(config, resumed)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        show_bar = interactive() if cfg.progress_bar is None else cfg.progress_bar
        if show_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=total_steps, loss="-")
            self._progress.start()

    def check(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Raise Divergence on NaN/Inf; warn on a spike over the running mean. Every rank calls it."""
        bad = [name for name, v in (("loss", loss), ("grad norm", grad_norm))
               if v is not None and not math.isfinite(v)]
        if bad:
            raise Divergence(
                f"step {step}: {' and '.join(bad)} is {loss if 'loss' in bad else grad_norm}; "
                f"stopping without saving, so the last checkpoint stays the last good state. "
                f"Lower optimizer.lr, raise schedule.warmup_steps or set optimizer.clip_grad"
            )
        if self.recent and self.cfg.loss_spike_factor > 0:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.cfg.loss_spike_factor * mean and self.enabled:
                log.warning("step %d: loss spike %.4f > %.1f x running mean %.4f",
                            step, loss, self.cfg.loss_spike_factor, mean)
        self.recent.append(loss)

    def log(self, step: int, record: dict, echo: bool = False) -> None:
        """Record `step`; print it every log_interval steps, or when `echo`. A validation-only
        record (step 0, eval-only) holds val_* keys and no training loss."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        if self._tb is not None:
            for key, value in _scalars(record):
                self._tb.add_scalar(key.replace(" ", "_"), value, step)
        if self._trackers:
            values = trackers.flatten(record)
            for tracker in self._trackers:
                tracker.log(step, values)
        if self._progress is not None and "loss" in record:
            self._progress.update(self._task, completed=step, loss=f"{record['loss']:.4f}")
        if echo or step % self.cfg.log_interval == 0:
            # nested values (per-layer MoE losses, tokens per expert) go to the files only
            parts = [f"step {step:>6}"] + [_fmt(k, v) for k, v in record.items()
                                           if v is not None and not isinstance(v, (dict, list))]
            line = " | ".join(parts)
            if self._progress is not None:
                self._progress.console.print(line)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _scalars(record: dict, prefix: str = ""):
    """(key, number) pairs of a record, nested dicts and lists flattened to key/sub/index
    (expert_tokens/<layer>/<expert>)."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, f"{name}/")
        elif isinstance(value, list):
            yield from _scalars({str(i): v for i, v in enumerate(value)}, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key.endswith("_per_s"):
            return f"{key} {value:.0f}"
        if key == "lr":
            return f"{key} {value:.3e}"
        return f"{key} {value:.4f}" if abs(value) < 1e4 else f"{key} {value:.3e}"
    return f"{key} {value}"
