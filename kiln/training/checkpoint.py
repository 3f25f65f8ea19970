"""Checkpoints as megatron-core dist_checkpointing (torch_dist) directories.

The layout (`iter_N/`, `latest`) is kiln.artifact's. Each checkpoint holds the model, the
optimizer, the scheduler, per-rank RNG states and the kiln training state.

A checkpoint is written to `iter_N.tmp`, renamed when every rank has finished,
and only then named by `latest`, so a crash mid-save never leaves a checkpoint
that `--resume` would pick. Model tensors are saved as global ShardedTensors, so a
checkpoint loads into any TP/PP/DP layout.
"""

from __future__ import annotations

import random
import shutil
import signal
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from kiln import artifact
from kiln.errors import CheckpointError

# the layout is kiln.artifact's; these are the names the training code calls it by
name = artifact.checkpoint_name
latest = artifact.latest_checkpoint
resolve = artifact.resolve_checkpoint

# The distributed optimizer's state is saved DP-reshardable: megatron-core 0.16.1's
# fully_reshardable loader fails on torch Adam's per-parameter `step` (KeyError) when
# TransformerEngine/Apex are absent. Model weights reshard to any TP/PP/DP either way.
DIST_OPTIMIZER_FORMAT = "dp_reshardable"


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
    """Per-rank RNG states, one per (PP, TP) rank, and per EP rank with expert parallelism (each EP
    rank seeds its own expert stream); ranks that differ only by data parallelism draw identical
    numbers, so they are replicas of one another."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()]
    coords = [ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()]
    replica = ps.get_data_parallel_rank()
    if ps.get_expert_model_parallel_world_size() > 1:
        shape.append(ps.get_expert_model_parallel_world_size())
        coords.append(ps.get_expert_model_parallel_rank())
        # the replicas of a coordinate: numbered by global rank among the ranks that share it
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, coords)
        replica = everyone[:torch.distributed.get_rank()].count(coords)
    return ShardedObject("kiln_rng_state", state, tuple(shape), tuple(coords), replica_id=replica)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
    }


def _same_model_parallel(a: dict | None, b: dict) -> bool:
    """Same TP, PP and expert split (checkpoints from before EP record none: EP 1, expert TP = TP)."""
    def split(layout: dict) -> tuple:
        return layout["tp"], layout["pp"], layout.get("ep", 1), layout.get("etp", layout["tp"])

    return a is not None and split(a) == split(b)


def _check_expert_optimizer(path: Path, saved: dict | None, now: dict) -> None:
    """megatron-core gives expert parameters an optimizer of their own only when EP > 1 (at EP 1
    they are ordinary data-parallel parameters), so optimizer state written on one side of that
    line has another structure than the other side's and cannot be resumed there."""
    ep = (saved or {}).get("ep", 1)
    if (ep > 1) != (now["ep"] > 1):
        raise CheckpointError(
            f"{path} holds optimizer state saved at EP={ep}, which cannot resume at EP={now['ep']}: megatron-core "
            f"keeps expert parameters in an optimizer of their own only when EP > 1. Resume with "
            f"{'parallel.ep > 1' if ep > 1 else 'parallel.ep=1'}, or start a new run at this EP with "
            f"checkpoint.load_weights={path} (the weights load into any EP)"
        )


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


def _forked_results_queue() -> None:
    """megatron-core's torch_dist writer collects its workers' results through a queue served by a
    multiprocessing Manager that it starts with "spawn": a fresh interpreter that re-imports torch and
    megatron-core, ~8 s per rank on a run's first save (measured on 2 cores). A Manager started by
    fork serves the same queue at once (the writer forks its workers anyway); it drops the rank's
    signal handlers, so it still ends on the signals a spawned one ends on (a SIGTERM from its
    owner's exit, Slurm's preemption signal) instead of outliving the rank. Set before its first use."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch import multiprocessing

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=_default_signal_handlers)
        filesystem_async._results_queue = manager.Queue()


def _default_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def save(ckpt_dir: str | Path, step: int, chunks, optimizer, scheduler, state: dict,
         keep_last: int | None = None, skip=None) -> Path:
    """Collective: every rank calls this. Returns the final checkpoint path. `skip(key)` leaves
    model tensors out (LoRA: the frozen base)."""
    from megatron.core import dist_checkpointing

    save_id = _save_id()

    def write(tmp: Path) -> None:
        sharded = _model_state(chunks, skip)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=_optimizer_metadata())
        sharded["scheduler"] = scheduler.state_dict()
        sharded["kiln_rng_state"] = _rng_sharded(_rng_state())
        sharded["kiln"] = {
            **state, "step": step, "layout": _layout(), "adam_steps": _adam_steps(optimizer),
            "distributed_optimizer": _is_distributed(optimizer), "save_id": save_id,
        }
        _forked_results_queue()
        dist_checkpointing.save(sharded, str(tmp), content_metadata=_optimizer_metadata())

    return _commit(Path(ckpt_dir), step, write, _estimate_bytes(chunks, optimizer), keep_last)


def save_weights(ckpt_dir: str | Path, step: int, chunks, state: dict, skip=None) -> Path:
    """Collective: a weights-only checkpoint (what `checkpoint.load_weights` and conversion read)."""
    from megatron.core import dist_checkpointing

    save_id = _save_id()

    def write(tmp: Path) -> None:
        sharded = _model_state(chunks, skip)
        sharded["kiln"] = {**state, "step": step, "layout": _layout(), "save_id": save_id}
        _forked_results_queue()
        dist_checkpointing.save(sharded, str(tmp))

    return _commit(Path(ckpt_dir), step, write, _estimate_bytes(chunks, None), None)


def _commit(ckpt_dir: Path, step: int, write, estimate: int, keep_last: int | None) -> Path:
    """Write a checkpoint into its partial directory, rename it, then mark it latest. Partial
    saves left by a crash are removed first (they hold space a resume needs); a save that does
    not fit the free space, or fails while writing, is one CheckpointError on every rank that
    names the space and the checkpoint that is still good, with its partial directory gone."""
    final, tmp = ckpt_dir / name(step), ckpt_dir / artifact.partial_name(step)
    rank = torch.distributed.get_rank()
    problem = ""
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        needed = max(estimate, _size(_latest_or_none(ckpt_dir)))
        free = shutil.disk_usage(ckpt_dir).free
        if needed > free:
            problem = _no_space(ckpt_dir, step, needed, free, "before writing")
        else:
            tmp.mkdir(parents=True)
    problem = _agree(problem)
    if not problem:
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            write(tmp)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 -- a failed write on one rank fails all
            problem = _first_cause(exc)
        problem = _agree(problem)
    if problem:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if not problem.startswith("cannot save"):
            free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.exists() else 0
            problem = _no_space(ckpt_dir, step, estimate, free, f"while writing ({problem})")
        raise CheckpointError(problem)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        artifact.mark_latest(ckpt_dir, final.name)
        if keep_last:
            _prune(ckpt_dir, keep_last)
    torch.distributed.barrier()
    return final


def _save_id() -> str:
    """One id per save, the same on every rank: what tells two checkpoints of the same step apart
    (kiln.artifact.digest reads it from common.pt instead of hashing every shard)."""
    ids = [uuid.uuid4().hex]
    torch.distributed.broadcast_object_list(ids, src=0)
    return ids[0]


def loaded_checkpoints(*paths: str | None) -> list[str]:
    """The checkpoint directories a run reads weights from, resolved to their iter_* directory:
    inputs of its manifest, so a pipeline sees when an upstream checkpoint changed."""
    return [str(resolve(p)) for p in paths if p]


def _first_cause(exc: BaseException) -> str:
    """The line that says what went wrong (DCP wraps a worker's OSError in a per-rank report)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line and ":" in line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {cause}"


def _agree(problem: str) -> str:
    """The first rank's problem, on every rank ('' when no rank has one)."""
    problems = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(problems, problem)
    return next((p for p in problems if p), "")


def _no_space(ckpt_dir: Path, step: int, needed: int, free: int, when: str) -> str:
    good = _latest_or_none(ckpt_dir)
    still = f"{good} is still the last good checkpoint" if good else "no checkpoint of this run was written yet"
    return (f"cannot save step {step} to {ckpt_dir} {when}: it needs about {needed / 2**20:.1f} MiB and the file "
            f"system has {free / 2**20:.1f} MiB free; {still}. Free space, or set checkpoint.dir elsewhere or a "
            f"lower checkpoint.keep_last, then resume")


def _latest_or_none(ckpt_dir: Path) -> Path | None:
    try:
        return latest(ckpt_dir)
    except CheckpointError:
        return None


def _size(path: Path | None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path else 0


def _estimate_bytes(chunks, optimizer) -> int:
    """Bytes a save writes: the weights once (DP replicas are saved by one rank), and with an
    optimizer Adam's two fp32 moments, plus fp32 master weights for bf16/fp16 parameters."""
    from megatron.core import parallel_state as ps

    total = 0
    if ps.get_data_parallel_rank() == 0:
        for chunk in chunks:
            for p in chunk.parameters():
                if optimizer is not None and not p.requires_grad:
                    continue
                extra = (8 + (4 if p.dtype != torch.float32 else 0)) if optimizer is not None else 0
                total += p.numel() * (p.element_size() + extra)
    count = torch.tensor([total], dtype=torch.float64)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


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
        if not any(k == "optimizer" or k.startswith("chained_") for k in _saved_keys(path)):
            raise CheckpointError(
                f"{path} holds weights only (no optimizer state): use checkpoint.load_weights "
                f"to start from it, not checkpoint.resume"
            )
        _prepare_adam_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(
            template, is_loading=True, metadata=_optimizer_metadata()
        )
        saved = common.get("kiln", {})
        now = _layout()
        same_layout = _same_model_parallel(saved.get("layout"), now) and saved["layout"]["dp"] == now["dp"]
        _check_expert_optimizer(path, saved.get("layout"), now)
        if saved.get("distributed_optimizer") and not _same_model_parallel(saved.get("layout"), now):
            old = saved["layout"]
            raise CheckpointError(
                f"{path} holds distributed-optimizer state for TP={old['tp']} PP={old['pp']} "
                f"EP={old.get('ep', 1)}, which reshards over DP only: resume with that TP/PP/EP, "
                f"or start a new run in this layout with checkpoint.load_weights={path}"
            )
        if same_layout:
            template["kiln_rng_state"] = _rng_sharded(None)
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        loaded, _, absent = dist_checkpointing.load(template, str(path), strict=StrictHandling.RETURN_ALL)
    except (KeyError, RuntimeError, FileNotFoundError, AssertionError, CheckpointException) as exc:
        raise CheckpointError(f"cannot load {path}: {_first_cause(exc)}") from None
    _accept_absent_extra_state(path, template, loaded, absent)

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


def _accept_absent_extra_state(path: Path, template: dict, loaded: dict, absent: set) -> None:
    """A checkpoint may lack `_extra_state` objects this model has: one saved with the local spec
    (CPU) or converted, loaded into TransformerEngine layers, whose norms carry extra state (FP8
    metadata) the local spec never writes. Those, and only those, load as None, which TE's
    set_extra_state accepts as "nothing saved"; any other absent tensor is an error."""
    missing = sorted(k for k in absent if not k.endswith("_extra_state"))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) this model needs: "
                              f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for name, part in template.items():
        if name.startswith("model"):
            _fill_none(part, loaded.setdefault(name, {}), set(absent))


def _fill_none(template: dict, loaded: dict, absent: set) -> None:
    for name, value in template.items():
        if isinstance(value, dict):
            _fill_none(value, loaded.setdefault(name, {}), absent)
        elif getattr(value, "key", None) in absent:
            loaded[name] = None


def _check_vocab_rows(path: Path, chunks) -> None:
    """Refuse weights whose padded vocabulary differs from this model's: megatron-core would load
    the overlap and leave the other rows at their random initialisation, and those rows still
    take part in every softmax, so the model would silently differ from the one saved."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    saved = dist_checkpointing.load_tensors_metadata(str(path)).get("embedding.word_embeddings.weight")
    from kiln.training.model import gpt_of

    padded, tp = getattr(gpt_of(chunks[0]), "vocab_size", None), ps.get_tensor_model_parallel_world_size()
    if saved is None or padded is None or saved.global_shape[0] == padded:
        return
    rows = saved.global_shape[0]
    fix = f"model.make_vocab_size_divisible_by={rows // tp}" if rows % tp == 0 else "the TP size it was saved with"
    raise CheckpointError(f"{path} pads the vocabulary to {rows} rows, this model to {padded} (at TP={tp}): "
                          f"set {fix} so the rows match")


def _saved_keys(path: Path) -> set[str]:
    """The top-level names of a checkpoint's tensors: the model's, and the optimizer's under
    `optimizer`, or `chained_<i>` when megatron-core chains several (an MoE model: dense and
    expert parameters each have their own)."""
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
