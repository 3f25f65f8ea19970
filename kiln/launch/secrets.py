"""Secrets (HF_TOKEN, WANDB_API_KEY, NGC keys) travel by name, never by value.

A job gets them from the submitting environment: Slurm's sbatch exports it to the job
(--export=ALL, the default) and pyxis passes the named variables into the container
(--container-env); Docker reads them from a 0600 env file mounted for the container's
lifetime. kiln writes a secret's value nowhere: not in a rendered script, a saved config,
a manifest or a log line. `scrub` is the last line of defence for text kiln prints or saves.
"""

from __future__ import annotations

import os
import re

from kiln.errors import ConfigError

_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def check_names(names: list[str], env: dict) -> None:
    for name in names:
        if not _NAME.match(name):
            raise ConfigError(f"launch.secrets: {name!r} is not an environment variable name")
        if name in env:
            raise ConfigError(
                f"launch.env sets {name}, which is also listed in launch.secrets: a secret's value must "
                f"not be written into the job; export it in your shell and list only its name"
            )


def present(names: list[str]) -> list[str]:
    """The listed secrets that the submitting environment actually has."""
    return [name for name in names if os.environ.get(name)]


def scrub(text: str, names: list[str]) -> str:
    """Replace every value of the named secrets in `text` with `<NAME>`."""
    for name in names:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, f"<{name}>")
    return text
