"""The `kiln` command: one subcommand per stage.

    kiln prepare --input corpus.jsonl --output data/prepared [--vocab-size 8192 | --tokenizer DIR]
    kiln pretrain --recipe tiny [field.path=value ...] [--nproc N] [--resume] [--dryrun]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from kiln.config import ConfigError


def quiet_library_warnings() -> None:
    """megatron-core and torch warn at import about optional GPU packages; say it once, in docs."""
    for pattern in (
        ".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
        ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*is deprecated.*", ".*cuda_graph_scope.*",
        ".*TypedStorage is deprecated.*", ".*Please use `torch.distributed.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


def _recipe(name: str):
    from kiln.recipes.pretrain import RECIPES

    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is unknown; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()


def _launched_by_scheduler() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def cmd_prepare(args) -> int:
    from kiln import overrides
    from kiln.config import PrepareConfig
    from kiln.data.prepare import prepare

    cfg = PrepareConfig(inputs=args.input, output_dir=args.output, text_field=args.text_field,
                        tokenizer=args.tokenizer, vocab_size=args.vocab_size, name=args.name)
    overrides.apply(cfg, args.overrides)
    summary = prepare(cfg)
    print(f"prepared {summary['documents']} documents, {summary['tokens']} tokens "
          f"({summary['tokens_per_second']} tokens/s) -> {summary['prefix']}")
    return 0


def cmd_pretrain(args) -> int:
    from kiln import overrides
    from kiln.stages import STAGES, load_config

    stage = STAGES["pretrain"]
    cfg = load_config(stage, args.config) if args.config else _recipe(args.recipe)
    overrides.apply(cfg, args.overrides)
    if args.resume:
        cfg.checkpoint.resume = True
    from kiln.training.pretrain import resolve

    cfg = resolve(cfg)
    nproc = args.nproc or cfg.parallel.world_size or cfg.parallel.tp * cfg.parallel.pp
    if args.dryrun:
        from kiln.training.dryrun import describe

        print(describe(cfg, nproc))
        return 0
    from kiln.training.validate import validate

    validate(cfg, nproc)
    if _launched_by_scheduler() or nproc == 1:
        from kiln.launch.worker import exit_code

        return exit_code(stage.run(cfg))
    from kiln.launch import local

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    return local.run(stage, cfg, nproc, Path(cfg.run_dir) / "config.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize JSONL text into a Megatron indexed dataset")
    p.add_argument("--input", action="append", required=True, help="JSONL file (repeatable)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="when training a tokenizer")
    p.add_argument("--name", default="corpus", help="dataset prefix name")
    p.add_argument("overrides", nargs="*", help="field=value")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="pretrain a GPT with megatron-core")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--recipe", default="tiny", help="tiny, gpt2_124m, llama3_8b, llama3_70b")
    source.add_argument("--config", help="a saved config.yaml instead of a recipe")
    p.add_argument("--nproc", type=int, help="local processes (default: parallel.world_size, else TPxPP)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--dryrun", action="store_true", help="print config, layout and memory; start nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.steps=100")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kiln: config error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from kiln.training.checkpoint import CheckpointError
        from kiln.training.metrics import Divergence

        if not isinstance(exc, (Divergence, CheckpointError)):
            raise
        print(f"kiln: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
