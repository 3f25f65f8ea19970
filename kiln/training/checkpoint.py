"""Checkpoints as megatron-core dist_checkpointing (torch_dist) directories.

Layout of a checkpoint directory:

    <dir>/iter_0000010/   one torch_dist checkpoint: model, optimizer, scheduler,
                          per-rank RNG states and the kiln training state
    <dir>/latest          the name of the newest complete checkpoint, written last

A checkpoint is written to `iter_N.tmp`, renamed when every rank has finished,
and only then named by `latest`, so a crash mid-save never leaves a checkpoint
that `--resume` would pick. Model tensors are saved as global ShardedTensors, so a
checkpoint loads into any TP/PP/DP layout.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from kiln.artifact import atomic_write_text

LATEST = "latest"
# The distributed optimizer's state is saved DP-reshardable: megatron-core 0.16.1's
# fully_reshardable loader fails on torch Adam's per-parameter `step` (KeyError) when
# TransformerEngine/Apex are absent. Model weights reshard to any TP/PP/DP either way.
DIST_OPTIMIZER_FORMAT = "dp_reshardable"


class CheckpointError(RuntimeError):
    pass


def name(step: int) -> str:
    return f"iter_{step:07d}"


def latest(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint named by the `latest` marker, or None."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None
    path = Path(ckpt_dir) / marker.read_text().strip()
    if not (path / "metadata.json").exists():
        raise CheckpointError(
            f"{marker} names {path.name}, which is not a complete checkpoint; remove the marker "
            f"to start fresh, or point it at an existing iter_* directory"
        )
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run's checkpoint root (then its latest checkpoint)."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no metadata.json) nor a directory with a `latest` marker"
        )
    return found


def _model_state(chunks, skip=None) -> dict:
    """The model's sharded state; `skip(key)` leaves tensors out (a base checkpoint has no
    adapters or new heads yet; a merged one keeps no adapters)."""
    def state(chunk):
        sd = chunk.module.sharded_state_dict()
        return {k: v for k, v in sd.items() if not (skip and skip(k))}

    if len(chunks) == 1:
        return {"model": state(chunks[0])}
    return {f"model{i}": state(c) for i, c in enumerate(chunks)}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict | None):
    """Per-(PP, TP) rank RNG states; DP ranks draw identical numbers, so they are replicas."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "kiln_rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _same_model_parallel(a: dict | None, b: dict) -> bool:
    return a is not None and (a["tp"], a["pp"]) == (b["tp"], b["pp"])


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_metadata() -> dict:
    return {"distrib_optim_sharding_type": DIST_OPTIMIZER_FORMAT}


def _torch_adams(optimizer) -> list:
    """The torch.optim Adam(W) instances inside a megatron-core optimizer (none with TE/Apex)."""
    inners = [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [opt if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else None for opt in inners]


def _adam_steps(optimizer) -> list[int]:
    """torch Adam's per-parameter `step` count, one per inner optimizer (see _restore_adam_step)."""
    steps = []
    for opt in _torch_adams(optimizer):
        counts = {int(s["step"]) for s in opt.state.values() if "step" in s} if opt else set()
        steps.append(counts.pop() if len(counts) == 1 else 0)
    return steps


def _prepare_adam_state(optimizer) -> None:
    """Give every parameter torch Adam state before a load: megatron-core's distributed optimizer
    reads the per-parameter `step` while building its loading template and asserts without it."""
    for opt in filter(None, _torch_adams(optimizer)):
        for group in opt.param_groups:
            for param in group["params"]:
                state = opt.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state.setdefault("step", torch.tensor(0.0))


def _restore_adam_step(optimizer, steps: list[int]) -> None:
    """Put back torch Adam's per-parameter `step` after a load.

    Without TransformerEngine or Apex, megatron-core falls back to torch.optim.Adam(W), which
    keeps a `step` per parameter that megatron-core's checkpoint formats do not carry
    reliably (the distributed optimizer rebuilds it from a param-group field that some formats
    lack). A wrong step changes Adam's bias correction, so a resumed run would drift without
    any error. kiln saves the counts in its own state and sets them here.
    """
    adams = _torch_adams(optimizer)
    for opt, step in zip(adams, steps, strict=True):
        for state in (opt.state.values() if opt else ()):
            if "exp_avg" in state:
                state["step"] = torch.tensor(float(step))


def save(ckpt_dir: str | Path, step: int, chunks, optimizer, scheduler, state: dict,
         keep_last: int | None = None, skip=None) -> Path:
    """Collective: every rank calls this. Returns the final checkpoint path. `skip(key)` leaves
    model tensors out (LoRA: the frozen base)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / name(step)
    tmp = ckpt_dir / f"{name(step)}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()

    sharded = _model_state(chunks, skip)
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_optimizer_metadata())
    sharded["scheduler"] = scheduler.state_dict()
    sharded["kiln_rng_state"] = _rng_sharded(_rng_state())
    sharded["kiln"] = {
        **state, "step": step, "layout": _layout(), "adam_steps": _adam_steps(optimizer),
        "distributed_optimizer": _is_distributed(optimizer),
    }
    dist_checkpointing.save(sharded, str(tmp), content_metadata=_optimizer_metadata())
    torch.distributed.barrier()

    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(ckpt_dir / LATEST, final.name + "\n")
        if keep_last:
            _prune(ckpt_dir, keep_last)
    torch.distributed.barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_weights(ckpt_dir: str | Path, step: int, chunks, state: dict, skip=None) -> Path:
    """Collective: a weights-only checkpoint (what `checkpoint.load_weights` and conversion read)."""
    from megatron.core import dist_checkpointing

    final = Path(ckpt_dir) / name(step)
    tmp = Path(ckpt_dir) / f"{name(step)}.tmp"
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    sharded = _model_state(chunks, skip)
    sharded["kiln"] = {**state, "step": step, "layout": _layout()}
    dist_checkpointing.save(sharded, str(tmp))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(Path(ckpt_dir) / LATEST, final.name + "\n")
    torch.distributed.barrier()
    return final


def load(path: str | Path, chunks, optimizer=None, scheduler=None, fresh=None) -> dict:
    """Load model weights, and with an optimizer the full training state, from `path`.

    Returns the saved kiln training state (step, consumed samples, ...). `fresh(key)` names
    model tensors the checkpoint does not hold (weights-only loads). Model tensors
    reshard to the current TP/PP/DP layout; RNG states are restored only when the layout
    is unchanged (they are per-rank streams that have no meaning in another layout).
    """
    from megatron.core import dist_checkpointing

    path = resolve(path)
    if optimizer is None:
        _check_vocab_rows(path, chunks)
    common = dist_checkpointing.load_common_state_dict(str(path))
    template = _model_state(chunks, fresh)
    full = optimizer is not None
    if full:
        if "optimizer" not in _saved_keys(path):
            raise CheckpointError(
                f"{path} holds weights only (no optimizer state): use checkpoint.load_weights "
                f"to start from it, not checkpoint.resume"
            )
        _prepare_adam_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(
            template, is_loading=True, metadata=_optimizer_metadata()
        )
        saved = common.get("kiln", {})
        same_layout = saved.get("layout") == _layout()
        if saved.get("distributed_optimizer") and not _same_model_parallel(saved.get("layout"), _layout()):
            raise CheckpointError(
                f"{path} holds distributed-optimizer state for TP={saved['layout']['tp']} "
                f"PP={saved['layout']['pp']}, which reshards over DP only: resume with that TP/PP, "
                f"or start a new run in this layout with checkpoint.load_weights={path}"
            )
        if same_layout:
            template["kiln_rng_state"] = _rng_sharded(None)
    try:
        loaded = dist_checkpointing.load(template, str(path))
    except (KeyError, RuntimeError, FileNotFoundError, AssertionError) as exc:
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc

    # `fresh` tensors (new adapters or heads) keep their initialisation
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=fresh is None)
    kiln_state = dict(common.get("kiln", {}))
    if full:
        # megatron-core copies into views of parameters that require grad; its dp_reshardable
        # loader (distrib_optimizer.load_parameter_state_from_dp_reshardable) lacks no_grad
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        # a checkpoint written by other tools has no counts: one Adam step per iteration then
        adams = len(_torch_adams(optimizer))
        _restore_adam_step(optimizer, kiln_state.get("adam_steps") or [kiln_state.get("step", 0)] * adams)
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
        if "kiln_rng_state" in loaded:
            _set_rng_state(loaded["kiln_rng_state"])
    return kiln_state


def _check_vocab_rows(path: Path, chunks) -> None:
    """Refuse weights whose padded vocabulary differs from this model's: megatron-core would load
    the overlap and leave the other rows at their random initialisation, and those rows still
    take part in every softmax, so the model would silently differ from the one saved."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    saved = dist_checkpointing.load_tensors_metadata(str(path)).get("embedding.word_embeddings.weight")
    padded, tp = getattr(chunks[0].module, "vocab_size", None), ps.get_tensor_model_parallel_world_size()
    if saved is None or padded is None or saved.global_shape[0] == padded:
        return
    rows = saved.global_shape[0]
    fix = f"model.make_vocab_size_divisible_by={rows // tp}" if rows % tp == 0 else "the TP size it was saved with"
    raise CheckpointError(f"{path} pads the vocabulary to {rows} rows, this model to {padded} (at TP={tp}): "
                          f"set {fix} so the rows match")


def _saved_keys(path: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    top = {key.split(".")[0] for key in dist_checkpointing.load_tensors_metadata(str(path))}
    return top


def read_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors of a checkpoint whose keys start with `prefix`, read in this
    process alone: no process group, megatron-core or model needed (inspection, tests)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(resolve(path)))
    metadata = reader.read_metadata().state_dict_metadata
    wanted = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if isinstance(meta, TensorStorageMetadata) and key.startswith(prefix)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        load(wanted, storage_reader=reader, no_dist=True)
    return wanted
