"""Where and how stages run: validation before launch, NeMo-Run tasks, and the local, Slurm and
Docker executors.

From Python, `to_partial(cfg, executor)` is a stage as a NeMo-Run task, validated for that
executor's world size: `run.run(to_partial(cfg, executor), executor=executor)`.
"""

from kiln.launch.driver import to_partial

__all__ = ["to_partial"]
