"""The `kiln serve` stage: validate, load the model on every rank, answer HTTP on rank 0.

An HF directory is served by transformers in one process; a kiln checkpoint by megatron-core on
TP x PP ranks (torchrun when more than one), rank 0 running the HTTP server and broadcasting
each job, the others following. Serving writes no artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.config import ServeConfig
from kiln.errors import KilnError
from kiln.validation import Check, Problems, check_inputs, check_ranges, ensure_valid

SOURCE = "an HF directory (config.json) or a kiln run / checkpoint directory"


def is_hf(source: str) -> bool:
    return (Path(source) / "config.json").exists()


def validate(cfg: ServeConfig, check: Check, problems: Problems) -> None:
    """Layout and lengths against the source's model, read before any process group starts."""
    from kiln.data.chat import BUILTIN

    check_ranges(cfg, problems)
    check_inputs("source", cfg.source, SOURCE, check, problems)
    if cfg.chat_template != "tokenizer" and cfg.chat_template not in BUILTIN:
        problems.add(f"chat_template={cfg.chat_template!r}: use 'tokenizer' or one of {', '.join(BUILTIN)}")
    p = cfg.parallel
    ranks = p.tp * p.pp
    if p.vpp or p.sequence_parallel:
        problems.add("parallel.vpp and parallel.sequence_parallel are training layouts: leave them unset to serve")
    if check.world_size != ranks:
        problems.add(f"serving runs one copy of the model on TP x PP = {ranks} rank(s), but the launch has "
                     f"{check.world_size}: set --nproc {ranks} (or leave it unset)")
    if not cfg.source or not Path(cfg.source).exists():
        return
    if is_hf(cfg.source):
        if ranks > 1:
            problems.add(f"parallel.tp={p.tp} parallel.pp={p.pp}: an HF directory is served by transformers in "
                         f"one process; serve the kiln checkpoint (`kiln convert --to megatron`) to split it")
        config = json.loads((Path(cfg.source) / "config.json").read_text())
        positions = config.get("max_position_embeddings") or config.get("n_positions")
        tokenizer = cfg.tokenizer or cfg.source
    else:
        from kiln.training.inference import read

        try:
            info = read(cfg.source)
        except KilnError as exc:
            problems.add(f"source: {exc}")
            return
        m = info.model
        for count, what in ((m.num_attention_heads, "attention heads"), (m.heads_kv, "KV heads"),
                            (info.rows, "vocabulary rows")):
            if count and count % p.tp:  # rows: None without a saved embedding
                problems.add(f"parallel.tp={p.tp} does not divide the model's {count} {what}: choose a divisor")
        if m.num_layers % p.pp:
            problems.add(f"parallel.pp={p.pp} does not divide the model's {m.num_layers} layers: choose a divisor")
        positions = m.max_position_embeddings
        tokenizer = cfg.tokenizer or info.tokenizer
        if not tokenizer:
            problems.add("tokenizer: the checkpoint records no tokenizer; give --tokenizer DIR")
    if tokenizer and not (Path(tokenizer) / "tokenizer.json").exists() and \
            not (Path(tokenizer) / "tokenizer_config.json").exists():
        check.missing(problems, f"tokenizer: {tokenizer} holds no tokenizer.json; give --tokenizer DIR")
    if not (positions or cfg.max_model_len):
        problems.add("max_model_len: the model's config names no max_position_embeddings; set max_model_len")
    if cfg.max_model_len and positions and cfg.max_model_len > positions:
        problems.add(f"max_model_len={cfg.max_model_len} exceeds the model's {positions} positions: lower it "
                     f"(or leave it unset)")


def serve(cfg: ServeConfig) -> dict:
    """Serve until interrupted (Ctrl-C, SIGTERM); returns what was served."""
    import uvicorn

    from kiln.data.chat import ChatFormatter
    from kiln.errors import TemplateError
    from kiln.serving.app import Served, build_app
    from kiln.serving.engine import Engine, follow
    from kiln.training.distributed import process_env

    penv = process_env()
    ensure_valid(cfg, validate, check=Check(world_size=penv.world_size), what="the serve config")
    if is_hf(cfg.source):
        from kiln.serving.hf import HFBackend

        backend = HFBackend(cfg)
    else:
        from kiln.serving.megatron import MegatronBackend

        backend = MegatronBackend(cfg)
    name = cfg.model_name or Path(cfg.source).resolve().name
    try:
        if penv.rank != 0:
            follow(backend)
            return {"served": name}
        try:
            chat = ChatFormatter(backend.tokenizer, cfg.chat_template)
        except TemplateError as exc:  # completions still work; chat requests get this message
            chat = f"no chat template: {exc}"
        served = Served(name, cfg.max_model_len or backend.positions, cfg.max_tokens, chat)
        engine = Engine(backend, cfg.max_queue, penv.world_size)
        print(f"kiln serve: {name} at http://{cfg.host}:{cfg.port}/v1 ({penv.world_size} rank(s), context "
              f"{served.max_model_len} tokens)", flush=True)
        try:
            uvicorn.run(build_app(engine, served), host=cfg.host, port=cfg.port, log_level="warning")
        finally:
            engine.close()
    finally:
        backend.close()
    return {"served": name}
