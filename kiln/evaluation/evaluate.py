"""`kiln eval`: lm-evaluation-harness suites on an HF directory (lm-eval's `hf` model), a kiln
Megatron checkpoint (kiln's engine under TP/PP, `MegatronLM`) or an OpenAI-compatible endpoint
(lm-eval's `local-completions`), fully offline. Writes lm-eval's results and samples, and
`eval_summary.json`: what was scored (artifact and tokenizer digests, harness version, task
file digests, limit, seed) and each metric with its standard error. With a baseline it is a gate.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from kiln.artifact import atomic_dir, digest, write_manifest
from kiln.config import EvalConfig
from kiln.errors import ConfigError
from kiln.evaluation import gate, suites
from kiln.training import trackers
from kiln.training.distributed import process_env
from kiln.validation import Check, Problems, check_output_dir, check_ranges, ensure_valid

SUITES = ("heldout", "demo")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DISABLE_MULTIPROC": "1"}  # lm-eval's bootstrap forks a pool otherwise: not inside ranks


def source_kind(cfg: EvalConfig) -> str:
    if cfg.endpoint:
        return "endpoint"
    return "hf" if (Path(cfg.source) / "config.json").exists() else "megatron"


def validate(cfg: EvalConfig, check: Check, problems: Problems) -> None:
    check_ranges(cfg, problems)
    unknown = sorted(set(cfg.suites) - set(SUITES))
    if unknown:
        problems.add(f"suites: {', '.join(unknown)} unknown; choose from {', '.join(SUITES)}, and give your own "
                     f"lm-eval task YAMLs with tasks=[...] (--task FILE)")
    if not cfg.suites and not cfg.tasks:
        problems.add("nothing to evaluate: set suites (heldout, demo) or tasks (lm-eval task YAMLs)")
    if "heldout" in cfg.suites and not cfg.heldout:
        problems.add("suites has heldout but heldout is unset: give the heldout.jsonl that `kiln prepare "
                     "heldout=0.01` set aside (--heldout runs/data/heldout.jsonl)")
    elif "heldout" in cfg.suites and not check.will_exist(cfg.heldout):
        check.missing(problems, f"heldout={cfg.heldout} does not exist")
    if cfg.endpoint:
        url = urlparse(cfg.endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            problems.add(f"endpoint={cfg.endpoint} is not an http(s) URL: give the server's base, e.g. "
                         f"http://127.0.0.1:8000/v1")
        if not (cfg.tokenizer or cfg.source):
            problems.add("endpoint: lm-eval counts tokens with the model's tokenizer: give it as source or tokenizer")
        if cfg.parallel.tp * cfg.parallel.pp > 1:
            problems.add("parallel: an endpoint is scored by its server; TP/PP apply to Megatron checkpoints")
    elif not cfg.source:
        problems.add("source is unset: give an HF directory or a kiln run / checkpoint directory")
    elif not check.will_exist(cfg.source):
        check.missing(problems, f"source={cfg.source} does not exist")
    elif source_kind(cfg) == "hf" and cfg.parallel.tp * cfg.parallel.pp > 1:
        problems.add("parallel: an HF directory is scored by lm-eval's hf model in one process; TP/PP apply to "
                     "kiln Megatron checkpoints (or serve it with `kiln serve --tp N` and use --endpoint)")
    if check.world_size != cfg.parallel.tp * cfg.parallel.pp:
        problems.add(f"parallel: TP x PP = {cfg.parallel.tp * cfg.parallel.pp} but {check.world_size} processes "
                     f"are launched: evaluation runs one model replica, so launch TP x PP processes")
    if cfg.parallel.vpp:
        problems.add("parallel.vpp: evaluation walks the pipeline stage by stage; leave vpp unset")
    if cfg.baseline and not check.will_exist(cfg.baseline):
        check.missing(problems, f"baseline={cfg.baseline} does not exist: give an earlier eval_summary.json")
    for task in cfg.tasks:
        try:
            suites.user_task(task)
        except ConfigError as exc:
            problems.add(str(exc))
    check_output_dir("output_dir", cfg.output_dir, problems)


def _max_length(cfg: EvalConfig, positions: int | None) -> int:
    return cfg.max_length or positions or 2048


@contextmanager
def _model(cfg: EvalConfig, kind: str):
    """(lm-eval model, model_args, what was scored), the Megatron model loaded for the block."""
    if kind == "megatron":
        from transformers import AutoTokenizer

        from kiln.evaluation.megatron_lm import MegatronLM
        from kiln.training.inference import loaded

        with loaded(cfg.source, cfg.parallel, cfg.dtype) as model:
            tokenizer_dir = cfg.tokenizer or model.tokenizer
            if not tokenizer_dir:
                raise ConfigError(f"{model.path} records no tokenizer: give tokenizer=<HF tokenizer dir>")
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            length = _max_length(cfg, model.model.max_position_embeddings)
            yield MegatronLM(model, tokenizer, length, cfg.batch_size, cfg.seed), None, {
                "kind": kind, "path": str(model.path), "step": model.step, "tokenizer": tokenizer_dir,
                "max_length": length, "parallel": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp}}
        return
    tokenizer_dir = cfg.tokenizer or cfg.source
    if kind == "hf":
        positions = json.loads((Path(cfg.source) / "config.json").read_text()).get("max_position_embeddings")
        length = _max_length(cfg, positions)
        args = {"pretrained": cfg.source, "tokenizer": tokenizer_dir, "dtype": cfg.dtype, "max_length": length,
                "device": "cuda" if _cuda() else "cpu"}
        yield "hf", args, {"kind": kind, "path": cfg.source, "tokenizer": tokenizer_dir, "max_length": length}
        return
    from kiln.evaluation.endpoint import served_model

    name = served_model(cfg.endpoint, cfg.endpoint_model)
    length = _max_length(cfg, None)
    args = {"base_url": cfg.endpoint.rstrip("/") + "/completions", "model": name, "tokenizer": tokenizer_dir,
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": length,
            "num_concurrent": 1, "max_retries": 2}
    yield "local-completions", args, {"kind": kind, "endpoint": cfg.endpoint, "model": name,
                                      "tokenizer": tokenizer_dir, "max_length": length}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate(cfg: EvalConfig) -> dict:
    """Run the suites; returns the summary (also written as eval_summary.json and in kiln.json)."""
    ensure_valid(cfg, validate, check=Check(world_size=process_env().world_size),
                 what="the eval config")
    started = time.time()
    os.environ.update(OFFLINE)  # before datasets / lm_eval import: both read these once
    kind = source_kind(cfg)
    with tempfile.TemporaryDirectory(prefix="kiln-eval-tasks-") as staging:
        return _evaluate(cfg, kind, Path(staging), started)


def _evaluate(cfg: EvalConfig, kind: str, staging: Path, started: float) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_files = suites.kiln_suites(cfg.suites, cfg.heldout, staging) + [suites.user_task(t) for t in cfg.tasks]
    names = [n for f in task_files for n in f.names]
    manager = TaskManager(include_path=sorted({str(f.path.parent) for f in task_files}), include_defaults=False)
    with _model(cfg, kind) as (model, args, scored):
        results = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=names, task_manager=manager, limit=cfg.limit,
            bootstrap_iters=1000, log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed, batch_size=None if kind == "megatron"
            else cfg.batch_size)
    if process_env().rank != 0 or results is None:  # one rank writes (the process groups are gone by now)
        return {}
    summary = {
        "artifact": {**scored, **({"digest": digest(scored["path"])} if kind != "endpoint" else {})},
        "tokenizer_digest": digest(Path(scored["tokenizer"]) / "tokenizer.json")
        if (Path(scored["tokenizer"]) / "tokenizer.json").exists() else None,
        "harness": {"name": "lm-eval", "version": lm_eval.__version__},
        "tasks": suites.digests(task_files), "limit": cfg.limit, "seed": cfg.seed,
        "metrics": gate.metrics(results),
    }
    if cfg.baseline:
        summary["gate"] = gate.compare(summary, json.loads(Path(cfg.baseline).read_text()), cfg.tolerance,
                                       cfg.baseline)
    with atomic_dir(cfg.output_dir) as tmp:
        _write_results(tmp, results)
        shutil.copytree(staging, tmp / "tasks")
        (tmp / "eval_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        inputs = [*([scored["path"]] if kind != "endpoint" else []), *cfg.tasks,
                  *sorted({str(d) for f in task_files for d in f.data})]
        write_manifest(tmp, "eval", cfg, inputs, summary, started)
    tracked = trackers.log_eval(summary, cfg.output_dir)  # into the W&B / MLflow runs of the scored model's training
    print(gate.table(summary), flush=True)
    if tracked is not None:
        print(f"logged to the experiment trackers of {tracked}", flush=True)
    gate.enforce(summary)
    return summary


def _write_results(out: Path, results: dict) -> None:
    samples = results.pop("samples", {})
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for task, rows in samples.items():
        with open(out / f"samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")

