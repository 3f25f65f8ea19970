"""The `kiln` command: one subcommand per registered stage, plus `pipeline`.

    kiln curate --input raw.jsonl.zst --output data/curated [--pii]
    kiln prepare --input corpus.jsonl --output data/prepared [--vocab-size 8192 | --tokenizer DIR]
    kiln pretrain --recipe tiny [field.path=value ...] [--nproc N] [--resume] [--dryrun]
    kiln sft|dpo|rm|rlhf --recipe tiny [field.path=value ...]
    kiln convert SOURCE --to hf|megatron|nemo2|nemo --output DIR
    kiln export SOURCE --to trtllm --output DIR --tp 2
    kiln pipeline run|status tiny [--watch]
    kiln report tiny | runs/demo | runs/demo/pretrain [--output DIR] [--baseline eval_summary.json]

This module only turns argv into configs: the subcommands, their flags and recipes come from
kiln.stages, and what happens next (validation, dry run, run here or submit) is kiln.launch's.
"""

from __future__ import annotations

import argparse
import sys

from kiln import bootstrap, overrides
from kiln.errors import ConfigError, KilnError
from kiln.stages import STAGES, Stage, load_config
from kiln.validation import Problems, check_ranges


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Stage overrides and `launch.*` overrides (which configure the executor)."""
    launch = [i[len("launch."):] for i in items if i.startswith("launch.")]
    return [i for i in items if not i.startswith("launch.")], launch


def launch_config(args, launch_overrides: list[str]):
    from kiln.launch.config import LaunchConfig
    from kiln.launch.sites import load_site

    launch = load_site(args.site) if args.site else LaunchConfig()
    if args.executor:
        launch.executor = args.executor
    overrides.apply(launch, launch_overrides)
    problems = Problems()
    check_ranges(launch, problems, "launch.")
    problems.raise_if_any("the launch config")
    return launch


def stage_config(stage: Stage, args, stage_overrides: list[str]):
    """The recipe (or saved config, or the config's defaults), then the flags, then overrides."""
    if getattr(args, "config", None):
        cfg = load_config(stage, args.config)
    elif stage.recipes:
        recipes = stage.recipe_table()
        if args.recipe not in recipes:
            raise ConfigError(f"--recipe {args.recipe!r} is unknown for {stage.name}; choose one of "
                              f"{', '.join(recipes)}")
        cfg = recipes[args.recipe]()
    else:
        cfg = stage.config()
    for flag in stage.flags:
        value = getattr(args, _dest(flag), None)
        if value is not None and not (flag.kind == "switch" and value is False):
            overrides.set_path(cfg, flag.field, value)
    overrides.apply(cfg, stage_overrides)
    return cfg


def cmd_stage(args) -> int:
    from kiln.launch import driver

    stage = STAGES[args.command]
    stage_overrides, launch_overrides = _split_overrides(args.overrides)
    cfg = stage_config(stage, args, stage_overrides)
    launch = launch_config(args, launch_overrides)
    if getattr(args, "backend", "kiln") == "nemo-aligner":
        return driver.launch_aligner(stage, cfg, launch, args.aligner_input, dryrun=args.dryrun)
    return driver.launch_stage(stage, cfg, launch, nproc=getattr(args, "nproc", None), dryrun=args.dryrun,
                               detach=args.detach)


def cmd_pipeline(args) -> int:
    from kiln import pipeline as pl
    from kiln.launch import driver
    from kiln.recipes.pipeline import RECIPES

    if args.recipe not in RECIPES:
        raise ConfigError(f"pipeline recipe {args.recipe!r} is unknown; choose one of {', '.join(RECIPES)}")
    stage_overrides, launch_overrides = _split_overrides(args.overrides)
    pipeline = pl.with_overrides(RECIPES[args.recipe](), stage_overrides)
    if args.watch and args.action != "status":
        raise ConfigError("--watch goes with `kiln pipeline status`: run the pipeline in one terminal and "
                          f"`kiln pipeline status {args.recipe} --watch` in another")
    if args.action == "status":
        if args.watch:
            return pl.watch(pipeline, args.interval)
        print(pl.status_table(pipeline))
        return 0
    return driver.launch_pipeline(pipeline, launch_config(args, launch_overrides), dryrun=args.dryrun,
                                  detach=args.detach)


def cmd_report(args) -> int:
    """A recipe name reports that pipeline's stages (overrides apply, as for `kiln pipeline`); an
    existing path reports that stage's directory, or the pipeline whose root it is."""
    from pathlib import Path

    from kiln import pipeline as pl
    from kiln import report
    from kiln.recipes.pipeline import RECIPES

    if Path(args.target).exists() or "/" in args.target:  # a path: one that is missing is said so
        if args.overrides:
            raise ConfigError(f"overrides ({' '.join(args.overrides)}) apply to a pipeline recipe, not to the "
                              f"directory {args.target}: leave them out")
        path = report.report_path(args.target, args.output, args.baseline)
    elif args.target in RECIPES:
        pipeline = pl.with_overrides(RECIPES[args.target](), args.overrides)
        path = report.report_pipeline(pipeline, args.output, args.partial, args.baseline)
    else:
        raise ConfigError(f"{args.target!r} is neither a directory nor a pipeline recipe: give a stage's or a "
                          f"pipeline's directory (e.g. runs/demo), or one of {', '.join(RECIPES)}")
    print(f"report: {path}")
    return 0


def _dest(flag) -> str:
    return flag.name.lstrip("-").replace("-", "_")


def _add_flag(parser, flag) -> None:
    kwargs = {"help": flag.help or None, "dest": _dest(flag)}
    if not flag.name.startswith("-"):  # positional
        parser.add_argument(flag.name, help=flag.help or None)
        return
    if flag.kind == "switch":
        parser.add_argument(flag.name, action="store_true", **kwargs)
    elif flag.kind == "toggle":
        parser.add_argument(flag.name, action=argparse.BooleanOptionalAction, default=None, **kwargs)
    else:
        parser.add_argument(flag.name, action="append" if flag.kind == "list" else "store", type=flag.type,
                            choices=flag.choices or None, required=flag.required, **kwargs)


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
    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help)
        if stage.recipes:
            source = p.add_mutually_exclusive_group()
            source.add_argument("--recipe", default="tiny", help=", ".join(stage.recipe_table()))
            source.add_argument("--config", help="a saved config.yaml instead of a recipe")
        else:
            p.add_argument("--config", help="a saved config.yaml; flags and overrides apply on top")
        for flag in stage.flags:
            _add_flag(p, flag)
        if stage.distributed:
            p.add_argument("--nproc", type=int, help="local processes (default: parallel.world_size, else TPxPP)")
        if stage.aligner:
            p.add_argument("--backend", choices=["kiln", "nemo-aligner"], default="kiln",
                           help="nemo-aligner: render and launch NeMo-Aligner's trainer in its container")
            p.add_argument("--aligner-input", help="nemo-aligner: the .nemo model (from kiln convert --to nemo)")
        add_launch_args(p)
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 launch.slurm.nodes=8")
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("pipeline", help="run a pipeline recipe's stages as one experiment, or show them")
    p.add_argument("action", choices=["run", "status"])
    p.add_argument("recipe", nargs="?", default="tiny")
    add_launch_args(p)
    p.add_argument("--watch", action="store_true", help="status: refresh until every stage is done (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=2.0, help="--watch: seconds between refreshes")
    p.add_argument("overrides", nargs="*", help="stage.field=value, e.g. pretrain.train.steps=100")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("report", help="an HTML page (and PNG figures) of a run, a stage or a pipeline")
    p.add_argument("target", help="a pipeline recipe (tiny), a pipeline's root (runs/demo) or a stage's directory")
    p.add_argument("--output", help="where to write index.html and the figures (default: <pipeline root>/report, "
                                    "or <dir>-report beside a stage's directory)")
    p.add_argument("--baseline", help="an earlier eval_summary.json to compare the eval scores with")
    p.add_argument("--partial", action="store_true", help="a recipe: report the stages that ran, list the others")
    p.add_argument("overrides", nargs="*", help="a recipe's stage.field=value overrides, as for `kiln pipeline`")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    bootstrap.start_process()
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
    except KilnError as exc:
        from kiln.launch.task import rank

        if rank() == 0:  # under srun or torchrun every rank runs this; one says it
            print(f"kiln: {'config error: ' if isinstance(exc, ConfigError) else ''}{exc}", file=sys.stderr)
        return exc.exit_code
    except FileNotFoundError as exc:
        print(f"kiln: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
