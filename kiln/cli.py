"""The `kiln` command: one subcommand per stage.

    kiln prepare --input corpus.jsonl --output data/prepared [--vocab-size 8192 | --tokenizer DIR]
    kiln pretrain --recipe tiny [field.path=value ...] [--nproc N] [--resume] [--dryrun]
    kiln curate --input raw.jsonl.zst --output data/curated [--pii]
    kiln sft|dpo|rm|rlhf --recipe tiny [field.path=value ...]
    kiln convert SOURCE --to hf|megatron|nemo2|nemo --output DIR
    kiln export SOURCE --to trtllm --output DIR --tp 2
    kiln pipeline run|status tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

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


def _recipe(name: str, stage: str = "pretrain"):
    from kiln.recipes import posttrain, pretrain

    recipes = pretrain.RECIPES if stage == "pretrain" else posttrain.RECIPES[stage]
    if name not in recipes:
        raise ConfigError(f"--recipe {name!r} is unknown for {stage}; choose one of {', '.join(recipes)}")
    return recipes[name]()


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


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Stage overrides and `launch.*` overrides (which configure the executor)."""
    launch = [i[len("launch."):] for i in items if i.startswith("launch.")]
    return [i for i in items if not i.startswith("launch.")], launch


def launch_config(args, launch_overrides: list[str]):
    from kiln import overrides
    from kiln.launch.config import LaunchConfig
    from kiln.launch.sites import load_site

    launch = load_site(args.site) if args.site else LaunchConfig()
    if args.executor:
        launch.executor = args.executor
    overrides.apply(launch, launch_overrides)
    return launch


def run_or_launch(stage_name: str, cfg, args, launch_overrides: list[str], nproc: int, describe=None) -> int:
    """Run in this process (world size 1, or already a rank under torchrun/srun), else launch
    through NeMo-Run on the chosen executor. Validation always happens here, first."""
    from kiln.launch import executors, submit
    from kiln.launch.task import run_stage
    from kiln.stages import STAGES

    stage = STAGES[stage_name]
    launch = launch_config(args, launch_overrides)
    world = executors.world_size(launch, nproc) if stage.distributed else 1
    stage.validate(cfg, world)
    if launch.executor == "slurm" and hasattr(cfg, "checkpoint"):
        cfg.checkpoint.resume = True  # a requeued job must continue, not restart
    if args.dryrun:
        if describe is not None:
            print(describe(cfg, world))
        if launch.executor != "local" or world > 1:
            print(submit.render(f"kiln-{stage_name}", [submit.Task(stage_name, cfg, world)], launch))
        return 0
    if launch.executor == "local" and (world == 1 or _launched_by_scheduler()):
        run_stage(cfg)  # exits 75 itself when preempted
        return 0
    result = submit.submit(f"kiln-{stage_name}", [submit.Task(stage_name, cfg, world)], launch,
                           detach=args.detach)
    if args.detach:
        print(f"submitted experiment {result.experiment_id} ({result.experiment_dir})")
        return 0
    print(f"experiment {result.experiment_id}: {result.states}")
    return 0 if result.ok else 1


def cmd_train(args) -> int:
    """pretrain, sft, dpo, rm, rlhf: a recipe (or saved config) plus overrides, on the engine."""
    from kiln import overrides
    from kiln.stages import STAGES, load_config
    from kiln.training.dryrun import describe
    from kiln.training.pretrain import resolve

    stage_overrides, launch_overrides = _split_overrides(args.overrides)
    cfg = load_config(STAGES[args.command], args.config) if args.config else _recipe(args.recipe, args.command)
    overrides.apply(cfg, stage_overrides)
    if args.resume:
        cfg.checkpoint.resume = True
    if getattr(args, "backend", "kiln") == "nemo-aligner":
        from kiln.alignment.aligner import run_aligner

        return run_aligner(args.command, cfg, launch_config(args, launch_overrides), args.aligner_input,
                           dryrun=args.dryrun)
    cfg = resolve(cfg)
    nproc = args.nproc or cfg.parallel.world_size or cfg.parallel.tp * cfg.parallel.pp
    return run_or_launch(args.command, cfg, args, launch_overrides, nproc,
                         describe=describe if args.dryrun else None)


def cmd_pipeline(args) -> int:
    from kiln import pipeline as pl
    from kiln.recipes.pipeline import RECIPES

    if args.recipe not in RECIPES:
        raise ConfigError(f"pipeline recipe {args.recipe!r} is unknown; choose one of {', '.join(RECIPES)}")
    stage_overrides, launch_overrides = _split_overrides(args.overrides)
    pipeline = pl.with_overrides(RECIPES[args.recipe](), stage_overrides)
    if args.action == "status":
        print(pl.status_table(pipeline))
        return 0
    return pl.run(pipeline, launch_config(args, launch_overrides), dryrun=args.dryrun, detach=args.detach)


def _stage_from_flags(stage_name: str, cfg, args) -> int:
    from kiln import overrides

    stage_overrides, launch_overrides = _split_overrides(args.overrides)
    overrides.apply(cfg, stage_overrides)
    result = run_or_launch(stage_name, cfg, args, launch_overrides, nproc=1)
    return result


def cmd_curate(args) -> int:
    from kiln.config import CurateConfig

    cfg = CurateConfig(inputs=args.input, output_dir=args.output, text_field=args.text_field, pii=args.pii,
                       strict=args.strict, workers=args.workers)
    return _stage_from_flags("curate", cfg, args)


def cmd_convert(args) -> int:
    from kiln.config import ConvertConfig

    cfg = ConvertConfig(source=args.source, output=args.output, to=args.to, tp=args.tp, dtype=args.dtype,
                        verify=args.verify, tokenizer=args.tokenizer)
    return _stage_from_flags("convert", cfg, args)


def cmd_export(args) -> int:
    from kiln.config import ExportConfig

    cfg = ExportConfig(source=args.source, output=args.output, to=args.to, tp=args.tp, pp=args.pp,
                       dtype=args.dtype, verify=args.verify, tokenizer=args.tokenizer)
    return _stage_from_flags("export", cfg, args)


def add_launch_args(parser) -> None:
    parser.add_argument("--executor", choices=["local", "slurm", "docker"],
                        help="where to run (default: local, or the site profile's)")
    parser.add_argument("--site", help="a site profile in slurm/sites/ (or a YAML path)")
    parser.add_argument("--detach", action="store_true", help="submit and return (slurm, docker)")
    parser.add_argument("--dryrun", action="store_true",
                        help="validate, print what would run (config, layout, sbatch script); start nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="normalize, redact PII and deduplicate a raw corpus")
    p.add_argument("--input", action="append", required=True, help="JSONL (.jsonl, .gz, .zst) or Parquet (repeatable)")
    p.add_argument("--output", required=True, help="output directory: curated_*.jsonl + curation_report.json")
    p.add_argument("--text-field", default="text")
    p.add_argument("--pii", action="store_true", help="redact emails, IP addresses, phone and card numbers")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of counting it")
    p.add_argument("--workers", type=int, default=2)
    add_launch_args(p)
    p.add_argument("overrides", nargs="*", help="field=value, e.g. jaccard_threshold=0.85 fuzzy_dedup=false")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("prepare", help="tokenize JSONL text into a Megatron indexed dataset")
    p.add_argument("--input", action="append", required=True, help="JSONL file (repeatable)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="when training a tokenizer")
    p.add_argument("--name", default="corpus", help="dataset prefix name")
    p.add_argument("overrides", nargs="*", help="field=value")
    p.set_defaults(func=cmd_prepare)

    helps = {
        "pretrain": "pretrain a GPT with megatron-core",
        "sft": "supervised fine-tuning on chat data (full or LoRA), packed",
        "dpo": "direct preference optimisation against a frozen reference",
        "rm": "train a reward model (scalar head, Bradley-Terry)",
        "rlhf": "RLHF: GRPO or PPO with generation on the Megatron model",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        source = p.add_mutually_exclusive_group()
        source.add_argument("--recipe", default="tiny",
                            help="tiny, gpt2_124m, llama3_8b, llama3_70b" if name == "pretrain" else "tiny")
        source.add_argument("--config", help="a saved config.yaml instead of a recipe")
        p.add_argument("--nproc", type=int, help="local processes (default: parallel.world_size, else TPxPP)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        if name in ("dpo", "rm", "rlhf"):
            p.add_argument("--backend", choices=["kiln", "nemo-aligner"], default="kiln",
                           help="nemo-aligner: render and launch NeMo-Aligner's trainer in its container")
            p.add_argument("--aligner-input", help="nemo-aligner: the .nemo model (from kiln convert --to nemo)")
        add_launch_args(p)
        p.add_argument("overrides", nargs="*",
                       help="dotted overrides, e.g. parallel.tp=2 train.steps=100 launch.slurm.nodes=8")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="HF <-> Megatron <-> .nemo, checked by logits")
    p.add_argument("source", help="HF directory, kiln run/checkpoint directory, NeMo 2 directory or .nemo file")
    p.add_argument("--to", required=True, choices=["hf", "megatron", "nemo2", "nemo"])
    p.add_argument("--output", required=True)
    p.add_argument("--tp", type=int, default=1, help="Megatron output: pad the vocabulary for this TP size")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the source's")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="compare logits (default: on below 2B parameters)")
    p.add_argument("--tokenizer", help="tokenizer directory, when the source does not record one")
    add_launch_args(p)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="TensorRT-LLM checkpoint (+ build.sh), or HF for serving")
    p.add_argument("source")
    p.add_argument("--to", required=True, choices=["trtllm", "hf"])
    p.add_argument("--output", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU reference forward over the rank shards vs the source (default: with float32)")
    p.add_argument("--tokenizer")
    add_launch_args(p)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pipeline", help="run a pipeline recipe's stages as one experiment, or show them")
    p.add_argument("action", choices=["run", "status"])
    p.add_argument("recipe", nargs="?", default="tiny")
    add_launch_args(p)
    p.add_argument("overrides", nargs="*", help="stage.field=value, e.g. pretrain.train.steps=100")
    p.set_defaults(func=cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    parser = build_parser()
    # overrides may come before, between and after options: collect the strays argparse left
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kiln: config error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from kiln.conversion.verify import ParityError
        from kiln.launch.slurm import SlurmError
        from kiln.training.checkpoint import CheckpointError
        from kiln.training.metrics import Divergence

        if not isinstance(exc, (Divergence, CheckpointError, SlurmError, ParityError)):
            raise
        print(f"kiln: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
