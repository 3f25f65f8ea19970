"""Run one phase of a data stage as Ray tasks that resume: a completed task leaves a marker.

A task is a module-level function writing its outputs under the run's work directory (shared
storage), each to a temp name renamed when complete; its marker (`<work>/done/<key>.json`, the
task's JSON summary plus the node it ran on) is written last, the same way. A rerun skips
every task with a marker, so a run whose node died or that was killed resumes from what was
complete and, the tasks being deterministic, gives the same bytes. Ray retries a task whose
worker or node died, and one that failed with an OSError (a flaky mount), `retries` times;
any other failure, or one past the retries, stops the run naming the task's input.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.artifact import atomic_write_text
from kiln.bootstrap import interactive
from kiln.errors import KilnError


class TaskFailed(KilnError):
    """A Ray task failed past its retries."""


@dataclass
class Task:
    key: str  # unique in the run: names the marker
    what: str  # what it reads, for the error that names it
    fn: Callable  # module-level, so Ray ships it by reference
    args: tuple = ()


@dataclass
class PhaseReport:
    tasks: int = 0
    reused: int = 0  # completed by an earlier, interrupted run
    seconds: float = 0.0
    nodes: list = field(default_factory=list)  # Ray node ids that ran this run's tasks

    def as_dict(self) -> dict:
        return {"tasks": self.tasks, "reused": self.reused, "seconds": round(self.seconds, 3),
                "nodes": len(self.nodes)}


def claim(work: Path, plan: dict, stage: str) -> None:
    """Reuse `work` only for the same plan (inputs, splits, result-shaping config); otherwise
    start it afresh: a resume must never mix two runs' intermediates."""
    text = json.dumps(plan, sort_keys=True, default=str)
    marker = work / "plan.json"
    if marker.exists() and marker.read_text() == text:
        return
    if work.exists():
        print(f"kiln {stage}: {work} holds another run's intermediates; starting afresh", flush=True)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_text(marker, text)


def input_stats(files: list[Path]) -> list[tuple]:
    """What identifies an input without reading it: path, size and modification time."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _execute(fn: Callable, args: tuple, marker: str) -> dict:
    import ray

    result = dict(fn(*args) or {})
    result["node"] = ray.get_runtime_context().get_node_id()
    atomic_write_text(Path(marker), json.dumps(result) + "\n")
    return result


def run(phase: str, tasks: list[Task], work: Path, retries: int,
        counter: str | None = None) -> tuple[list[dict], PhaseReport]:
    """Each task's summary, in the order given. `counter` names a summary field (e.g. documents)
    whose sum the progress line shows as a rate for the whole cluster."""
    import ray

    tic = time.perf_counter()
    done_dir = work / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    pending = []
    for task in tasks:
        marker = done_dir / f"{task.key}.json"
        if marker.exists():
            results[task.key] = json.loads(marker.read_text())
        else:
            pending.append(task)
    report = PhaseReport(tasks=len(tasks), reused=len(tasks) - len(pending))
    # SPREAD: a phase's tasks go round the nodes, so reading and writing use every node's disk and network
    remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=[OSError],
                        scheduling_strategy="SPREAD")(_execute)
    running = {remote.remote(t.fn, t.args, str(done_dir / f"{t.key}.json")): t for t in pending}
    progress = _Progress(phase, len(tasks), report.reused, counter)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
            for ref in ready:
                task = running.pop(ref)
                try:
                    results[task.key] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    if isinstance(cause, KilnError):
                        raise cause from None
                    raise TaskFailed(f"{phase} task {task.key} on {task.what} failed after {retries} retries: "
                                     f"{type(cause).__name__}: {cause}") from None
                except ray.exceptions.RayError as exc:
                    raise TaskFailed(f"{phase} task {task.key} on {task.what} was lost after {retries} retries "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0]}); rerun the same command "
                                     f"to resume from the completed tasks") from None
                if task.key in results:
                    report.nodes.append(results[task.key]["node"])
                progress.update(results[task.key])
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        progress.close()
    report.nodes = sorted(set(report.nodes))
    report.seconds = time.perf_counter() - tic
    return [results[t.key] for t in tasks], report


class _Progress:
    """Tasks done / total and, for the whole cluster, the rate of `counter`: a live line on a
    terminal, a line per tenth of the phase in a log."""

    def __init__(self, phase: str, total: int, done: int, counter: str | None):
        self.phase, self.total, self.done, self.counter = phase, total, done, counter
        self.count, self.started, self.logged = 0, time.perf_counter(), 0
        self.live = None
        if interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.live = Progress(TextColumn(f"kiln {phase}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)
            self.bar = self.live.add_task(phase, total=total, completed=done, rate="")
            self.live.start()

    def update(self, result: dict) -> None:
        self.done += 1
        self.count += int(result.get(self.counter, 0)) if self.counter else 0
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = f"{self.count / elapsed:,.0f} {self.counter}/s" if self.counter else ""
        if self.live is not None:
            self.live.update(self.bar, completed=self.done, rate=rate)
        elif self.done * 10 // max(self.total, 1) > self.logged or self.done == self.total:
            self.logged = self.done * 10 // max(self.total, 1)
            print(f"kiln {self.phase}: {self.done}/{self.total} tasks {rate}".rstrip(), flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def cpu_count() -> int:
    """CPUs of the connected cluster (what its tasks can run at once)."""
    import ray

    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
