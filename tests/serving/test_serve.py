"""`kiln serve` for real: a tiny Llama served from its HF directory (transformers) and from the kiln
checkpoint converted from it (megatron-core, TP 1 and 2), compared with transformers' `generate`,
kiln's own generation and lm-eval's `hf` model; bad requests; a full queue."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.conftest import ROOT, free_port
from tests.serving.models import hf_model, megatron_checkpoint

pytestmark = pytest.mark.slow  # starts servers

PROMPTS = ["The village of", "In the morning the baker"]
NEW = 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    hf = hf_model(root / "hf")
    return hf, megatron_checkpoint(hf, root / "kiln")


@contextlib.contextmanager
def server(source, *args, nproc: int = 1):
    """`kiln serve` in its own process group (under torchrun when nproc > 1); at the end SIGTERM to
    its first process must stop every process of the group."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "kiln.cli", "serve", str(source), "--port", str(port), *args]
    log = tempfile.NamedTemporaryFile("w+", prefix="kiln-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise AssertionError(f"kiln serve did not come up:\n{log.read()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # the leader only, as a service manager would: it must stop every rank itself
        try:
            proc.wait(30)
            left = not _group_ends(proc.pid, 30)
        except subprocess.TimeoutExpired:
            left = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        os.unlink(log.name)
    assert not left, "kiln serve left processes behind after SIGTERM"


def _group_ends(group: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def hf_server(sources):
    with server(sources[0], "--chat-template", "chatml", "max_queue=1") as url:
        yield url


def complete(url, **body):
    response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def greedy_ids(url, prompt):
    return complete(url, prompt=prompt, max_tokens=NEW, temperature=0, return_token_ids=True)["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def reference(sources):
    """transformers' own greedy `generate` on the HF directory: prompt ids -> new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sources[0])
    model = AutoModelForCausalLM.from_pretrained(sources[0], dtype=torch.float32).eval()
    out = {}
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        generated = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        out[text] = generated[0, len(ids):].tolist()
    return out


def scores(url, ids):
    logprobs = complete(url, prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1)
    return logprobs["choices"][0]["logprobs"]["token_logprobs"]


def test_hf_backend_equals_transformers_generate(hf_server, reference):
    for text in PROMPTS:
        assert greedy_ids(hf_server, text) == reference[text]
    assert requests.get(f"{hf_server}/v1/models").json()["data"][0]["id"] == "hf"


def test_streaming_stop_strings_and_seeded_sampling(hf_server):
    whole = complete(hf_server, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)["choices"][0]
    stream = requests.post(f"{hf_server}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": NEW,
                                                                "temperature": 0, "stream": True}, stream=True)
    events = [line[len("data: "):] for line in stream.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"] == "length"

    stop = whole["text"][3:5]
    cut = complete(hf_server, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=[stop])["choices"][0]
    assert cut["text"] == whole["text"][: whole["text"].index(stop)] and cut["finish_reason"] == "stop"

    sampled = [complete(hf_server, prompt=PROMPTS[1], max_tokens=NEW, temperature=0.9, top_p=0.9, seed=s,
                        return_token_ids=True)["choices"][0]["token_ids"] for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]

    chat = requests.post(f"{hf_server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] == 4


def test_bad_requests_are_4xx_and_the_server_keeps_serving(hf_server):
    post = f"{hf_server}/v1/completions"
    cases = [
        (requests.post(post, data="{not json", headers={"content-type": "application/json"}), 400),
        (requests.post(post, json={"max_tokens": 3}), 400),  # no prompt
        (requests.post(post, json={"prompt": "x", "model": "gpt-4"}), 404),
        (requests.post(post, json={"prompt": "x" * 4000}), 400),  # longer than the context
        (requests.post(post, json={"prompt": "x", "max_tokens": 1000}), 400),
        (requests.post(post, json={"prompt": [[1, 99999]]}), 400),  # a token id outside the vocabulary
        (requests.post(post, json={"prompt": "x", "temperature": -1}), 400),
        (requests.post(f"{hf_server}/v1/nothing", json={}), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"]
    assert requests.get(f"{hf_server}/health").ok
    assert greedy_ids(hf_server, PROMPTS[0])


def test_a_full_queue_answers_503(hf_server):
    """max_queue=1: while one request generates, the others are refused at once, not queued."""
    def one(_):
        return requests.post(f"{hf_server}/v1/completions",
                             json={"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(6)))
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses


def test_checkpoint_backend_equals_kiln_generate_and_the_hf_export(sources, hf_server, reference):
    from transformers import AutoTokenizer

    from kiln.config import GenerationConfig, ParallelConfig
    from kiln.conversion.verify import one_process_engine
    from kiln.training import checkpoint as ckpt
    from kiln.training.generate import generate
    from kiln.training.inference import read
    from kiln.training.model import build_model

    info = read(str(sources[1]))
    tok = AutoTokenizer.from_pretrained(sources[0])
    kiln_ids = {}
    with one_process_engine():
        chunks, _ = build_model(info.model_for(1), ParallelConfig(), "fp32", torch.device("cpu"), False)
        ckpt.load(info.path, chunks)
        for text in PROMPTS:
            kiln_ids[text] = generate(chunks[0], tok(text)["input_ids"], 1,
                                           GenerationConfig(max_new_tokens=NEW, temperature=0), {tok.eos_token_id},
                                           info.model.vocab_size, seed=0)[0]
    probe = tok(PROMPTS[1])["input_ids"]
    with server(sources[1]) as url:
        for text in PROMPTS:
            assert greedy_ids(url, text) == kiln_ids[text] == reference[text]
        assert scores(url, probe) == pytest.approx(scores(hf_server, probe), abs=1e-4, nan_ok=False)


@pytest.mark.parametrize("launch", [(("--tp", "2"), 1), (("parallel.pp=2",), 2)], ids=["tp2-cli", "pp2-torchrun"])
def test_two_ranks_serve_the_same_greedy_tokens(sources, reference, launch):
    """TP=2 as users start it (`kiln serve --tp 2` starts torchrun itself), PP=2 under torchrun."""
    args, nproc = launch
    with server(sources[1], *args, nproc=nproc) as url:
        for text in PROMPTS:
            assert greedy_ids(url, text) == reference[text]
        assert requests.post(f"{url}/v1/completions", json={"prompt": "x", "model": "other"}).status_code == 404
        assert greedy_ids(url, PROMPTS[0]) == reference[PROMPTS[0]]  # the ranks still agree after a refusal


MC = [{"question": "The village of", "choices": [" Hollow", " Mill", " bread"], "answer": 0},
      {"question": "In the morning the baker", "choices": [" sang", " baked bread", " slept"], "answer": 1},
      {"question": "The river runs", "choices": [" north", " through the town", " dry"], "answer": 2}]


def test_lm_eval_local_completions_equals_its_hf_model(sources, hf_server, tmp_path, monkeypatch):
    """lm-eval's OpenAI-compatible client against kiln serve scores each choice as lm-eval's own
    transformers model does on the same directory."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC))
    (tmp_path / "task.yaml").write_text(
        "task: kiln_serve_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    tasks = TaskManager(include_path=str(tmp_path))

    def loglikelihoods(model, args):
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["kiln_serve_mc"], task_manager=tasks,
                                      log_samples=True, bootstrap_iters=0)
        return [r[0][0] for s in out["samples"]["kiln_serve_mc"] for r in s["resps"]]

    served = loglikelihoods("local-completions", f"base_url={hf_server}/v1/completions,model=hf,"
                            f"tokenizer={sources[0]},tokenizer_backend=huggingface,tokenized_requests=True,"
                            "max_retries=1")
    local = loglikelihoods("hf", f"pretrained={sources[0]},dtype=float32,device=cpu")
    assert len(served) == 9
    assert served == pytest.approx(local, abs=1e-4)
