"""What one prompt of a request computes, and the queue in front of the model.

`complete` runs on every rank alike: the backend yields the same tokens on each (generate.py),
so stop strings end generation at the same step everywhere. Only rank 0 answers HTTP: it
broadcasts each job to the other ranks (`Engine`), which run it too (`follow`). The model runs
one job at a time, on one worker thread; `max_queue` bounds the jobs admitted (running or
waiting), so a burst beyond it is refused at once (503) instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kiln.config import GenerationConfig
from kiln.serving.protocol import RequestError


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    logprobs: int | None = None  # None: no log-probabilities
    echo: bool = False  # log-probabilities of the prompt's tokens too


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop (a stop token or string) | length
    logprobs: dict | None = None  # OpenAI's legacy completion logprobs


def complete(backend, job: Job, emit: Callable[[str], None] | None = None) -> Result:
    """Generate for one prompt; `emit` receives the text as it becomes final (streaming)."""
    ids: list[int] = []
    text, sent, finish = "", 0, "length"
    if job.max_tokens > 0:
        gen = GenerationConfig(max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p)
        with contextlib.closing(backend.stream(job.prompt, gen, job.seed)) as tokens:
            for token in tokens:
                ids.append(token)
                if token in backend.stop_ids:
                    finish = "stop"
                    break
                text = backend.tokenizer.decode(ids, skip_special_tokens=True)
                cut = _first_stop(text, job.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                final = len(text) - _held_back(text, job.stop)
                if emit and final > sent:
                    emit(text[sent:final])
                    sent = final
    if emit and len(text) > sent:
        emit(text[sent:])
    logprobs = _logprobs(backend, job, ids) if job.logprobs is not None else None
    return Result(text, ids, finish, logprobs)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end that may still change: an incomplete UTF-8 character (decoded as
    U+FFFD) or the beginning of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def _logprobs(backend, job: Job, ids: list[int]) -> dict:
    """OpenAI's legacy format over the returned tokens (with echo, the prompt's first: its first
    token has no log-probability): tokens, token_logprobs, top_logprobs, text_offset."""
    full = job.prompt + ids
    start = 0 if job.echo else len(job.prompt)
    chosen, values, top_ids = backend.logprobs(full, job.logprobs) if len(full) > 1 else (None, None, None)
    decode = backend.tokenizer.decode
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0 if job.echo else len(decode(job.prompt))
    for i in range(start, len(full)):
        piece = decode([full[i]])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if i == 0:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(float(chosen[i - 1]))
        top.append({decode([int(t)]): float(v) for t, v in zip(top_ids[i - 1][:job.logprobs],
                                                               values[i - 1][:job.logprobs], strict=True)})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class Engine:
    """Admission, and the one worker thread that runs jobs on the model (after broadcasting each
    to the other ranks, when there are any)."""

    def __init__(self, backend, max_queue: int, ranks: int = 1):
        self.backend, self.max_queue, self.ranks = backend, max_queue, ranks
        self.admitted = 0  # changed on the event loop's thread only
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="kiln-serve")

    def submit(self, jobs: list[Job], emit: Callable[[str], None] | None = None) -> asyncio.Future:
        """The results of `jobs` (one request's prompts, run in turn), or 503 when the queue is full."""
        if self.admitted >= self.max_queue:
            raise RequestError(503, f"the server is at its limit of {self.max_queue} queued requests "
                                    f"(serve max_queue); retry shortly", kind="server_overloaded")
        self.admitted += 1
        future = asyncio.get_running_loop().run_in_executor(self.worker, self._run, jobs, emit)
        future.add_done_callback(self._release)
        return future

    def _release(self, _future) -> None:
        self.admitted -= 1

    def _run(self, jobs: list[Job], emit) -> list[Result]:
        results = []
        for job in jobs:
            if self.ranks > 1:
                torch.distributed.broadcast_object_list([job], src=0)
            results.append(complete(self.backend, job, emit))
        return results

    def close(self) -> None:
        """Release the other ranks (they leave `follow`), after any job still running."""
        if self.ranks > 1:
            self.worker.submit(torch.distributed.broadcast_object_list, [None], src=0).result()
        self.worker.shutdown()


def follow(backend) -> None:
    """A rank other than 0: run each job rank 0 broadcasts, until it broadcasts None."""
    while True:
        box = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        try:
            complete(backend, box[0])
        except Exception as exc:  # rank 0 met the same error and answered it: keep serving
            print(f"kiln serve: a request failed: {exc!r}", file=sys.stderr, flush=True)
