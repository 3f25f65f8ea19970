"""Entry point of every launched process: `python -m kiln.launch.worker STAGE CONFIG.yaml`.

The launching side resolves and validates the config once and writes it as YAML;
each rank reads that file back into the stage's dataclass, so every process runs
exactly the config the user saw, with no second parse of overrides.
"""

from __future__ import annotations

import sys

from kiln.stages import STAGES, load_config


def exit_code(result) -> int:
    """0, or EXIT_PREEMPTED when the stage stopped for a requeue."""
    from kiln.training.preemption import EXIT_PREEMPTED

    return EXIT_PREEMPTED if isinstance(result, dict) and "preempted_at" in result else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in STAGES:
        print(f"usage: python -m kiln.launch.worker {{{','.join(STAGES)}}} CONFIG.yaml", file=sys.stderr)
        return 2
    from kiln.cli import quiet_library_warnings

    quiet_library_warnings()
    stage = STAGES[argv[0]]
    result = stage.run(load_config(stage, argv[1]))
    return exit_code(result)


if __name__ == "__main__":  # dist_checkpointing's worker processes re-import __main__
    sys.exit(main())
