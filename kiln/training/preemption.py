"""Preemption: a signal asks the loop to finish its step, checkpoint and exit for a requeue.

Schedulers warn before they kill: Slurm sends the configured signal (`--signal=USR1@120`) or
SIGTERM at preemption and time limit. A handler only records the request; at the end of each
step every rank learns whether any rank was signalled (one all-reduce), so all stop at the same
step, save together, and exit with EXIT_PREEMPTED. The job script requeues on that code and the
next run resumes from the checkpoint: no step is lost or repeated.
"""

from __future__ import annotations

import signal

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


class PreemptionHandler:
    def __init__(self, signal_names: list[str]):
        self.requested: str | None = None
        self._previous = {}
        for name in signal_names:
            signum = getattr(signal, name, None)
            if not isinstance(signum, signal.Signals):
                raise ValueError(f"train.preempt_signals: {name!r} is not a signal name (e.g. SIGTERM)")
            self._previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum, _frame) -> None:
        self.requested = signal.Signals(signum).name

    def should_stop(self, device: torch.device) -> bool:
        """Collective: True on every rank once any rank has been signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
