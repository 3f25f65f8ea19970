"""`kiln serve` under load: N concurrent clients send a fixed number of greedy completions to a
server on 127.0.0.1 (within a time cap); prints requests/s, p50/p99 latency and tokens/s.

Peer, measured in the same run on the same prompts and model: transformers' own `generate`
called sequentially in this process (no HTTP, no queue). kiln serve runs one request at a time
(no batching across requests), so the ratio is the cost of the HTTP layer, the queue and
token-by-token decoding with stop-string checks; concurrency adds queueing to the latency.

    python benchmarks/serve_load.py [--source HF_DIR] [--clients 8] [--requests 64] [--max-tokens 32]

Without --source it builds the tests' tiny Llama (tests/serving/models.py). OMP_NUM_THREADS=1 for
both sides, so they compete for one core each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The village of", "In the morning the baker", "The river runs", "Every winter the",
           "A traveller asked", "The old bridge", "At the market", "When the bell rang"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def server(source: Path, port: int):
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(source), "--port", str(port),
                             "max_queue=1024"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(360):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                    break
            if proc.poll() is not None:
                sys.exit("kiln serve exited during start-up")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def load(url: str, clients: int, count: int, max_tokens: int, cap: float) -> tuple[list[float], int, float]:
    """Latencies of the requests completed within `cap` seconds, their completion tokens, wall time."""
    deadline = time.perf_counter() + cap

    def one(i: int):
        if time.perf_counter() > deadline:
            return None
        tic = time.perf_counter()
        r = requests.post(f"{url}/v1/completions", timeout=cap, json={
            "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - tic, r.json()["usage"]["completion_tokens"]

    tic = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [d for d in pool.map(one, range(count)) if d is not None]
    return [d[0] for d in done], sum(d[1] for d in done), time.perf_counter() - tic


def peer(source: Path, count: int, max_tokens: int) -> tuple[float, int]:
    """transformers' sequential greedy `generate` on the same prompts: (wall seconds, new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    tokens = 0
    tic = time.perf_counter()
    for i in range(count):
        ids = torch.tensor([tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens)
        tokens += out.shape[1] - ids.shape[1]
    return time.perf_counter() - tic, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="an HF directory (default: build the tiny test model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cap", type=float, default=120.0, help="seconds; requests not started by then are skipped")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-serve-bench-") as scratch:
        source = args.source
        if source is None:
            sys.path.insert(0, str(ROOT))
            from tests.serving.models import hf_model

            source = hf_model(Path(scratch) / "hf")
        from kiln.training.distributed import free_port

        with server(source, free_port()) as url:
            load(url, 1, 2, args.max_tokens, args.cap)  # warm-up
            latencies, tokens, wall = load(url, args.clients, args.requests, args.max_tokens, args.cap)
        peer_wall, peer_tokens = peer(source, len(latencies), args.max_tokens)
    rps, peer_rps = len(latencies) / wall, len(latencies) / peer_wall
    print(f"kiln serve: {len(latencies)}/{args.requests} requests from {args.clients} clients in {wall:.2f} s: "
          f"{rps:.2f} req/s, {tokens / wall:.0f} tokens/s, latency p50 {statistics.median(latencies) * 1000:.0f} ms "
          f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms")
    print(f"peer (transformers generate, sequential, in-process): {peer_rps:.2f} req/s, "
          f"{peer_tokens / peer_wall:.0f} tokens/s")
    print(f"ratio kiln serve / peer: {rps / peer_rps:.2f}x requests/s")


if __name__ == "__main__":
    main()
