"""Checking a config before anything starts, reporting every broken rule at once.

Stage validators take a `Check` (the world size the launch will have, and which paths earlier
stages of the same pipeline will produce) and add each problem to a `Problems`; the launcher
raises them together as one ConfigError, one line per problem, so a user fixes a config in
one round instead of one rule per attempt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from kiln.config import Range
from kiln.errors import ConfigError


@dataclass
class Check:
    """What a validator knows besides the config."""

    world_size: int = 1
    # artifacts that earlier stages of this pipeline will write: they need not exist yet
    upcoming: set = field(default_factory=set)
    # input files: `require` them where the job will read them (here, or on a rank); `note` their
    # absence on a dry run; `skip` where this machine cannot see the job's file system (ssh
    # tunnel, containers with their own mounts): the ranks check them again where they run
    files: str = "require"

    def will_exist(self, path: str | Path) -> bool:
        if self.files == "skip":
            return True
        path = Path(path).resolve()
        return path.exists() or any(path == p or p in path.parents for p in map(Path, self.upcoming))

    def missing(self, problems: Problems, message: str) -> None:
        """Report an input that does not exist: an error, or a note on a dry run."""
        if self.files == "note":
            problems.note(message)
        elif self.files == "require":
            problems.add(message)


class Problems:
    def __init__(self):
        self.lines: list[str] = []
        self.notes: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.lines:
            self.lines.append(message)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def raise_if_any(self, what: str = "") -> None:
        if not self.lines:
            return
        if len(self.lines) == 1:
            raise ConfigError(self.lines[0])
        head = f"{len(self.lines)} problems{f' in {what}' if what else ''}:"
        raise ConfigError("\n".join([head, *(f"  - {line}" for line in self.lines)]))


def ensure_valid(cfg, *validators, check: Check | None = None, what: str = "") -> None:
    """Run `validators` (cfg, check, problems) and raise every problem at once: what a stage's
    entry does first, so a direct Python call is checked like a launched one."""
    problems = Problems()
    for validator in validators:
        validator(cfg, check or Check(), problems)
    problems.raise_if_any(what)


def check_ranges(cfg, problems: Problems, prefix: str = "") -> None:
    """Every field declared with a domain (`kiln.config.ranged`) holds a value inside it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        domain: Range | None = f.metadata.get("domain")
        if dataclasses.is_dataclass(value):
            check_ranges(value, problems, f"{path}.")
        elif domain is not None and value is not None and not isinstance(value, bool):
            if not isinstance(value, (int, float)) or value not in domain:
                problems.add(f"{path}={value!r} must be {domain}")


def check_inputs(field_name: str, paths: list | str, what: str, check: Check, problems: Problems) -> None:
    """Input paths that exist, or that an earlier stage of the pipeline writes; `what` is the fix."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not any(paths):
        problems.add(f"{field_name} is empty: give {what}")
    for path in filter(None, paths):
        if not check.will_exist(path):
            check.missing(problems, f"{field_name}: {path} does not exist: give {what}")


def check_output_dir(field_name: str, path: str, problems: Problems) -> None:
    """An output directory kiln will create: it may exist as a directory, never as a file."""
    if not path:
        problems.add(f"{field_name} is empty: give the directory to write")
        return
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == p else f" (its parent {candidate} is a file)"
                problems.add(f"{field_name}={path} cannot be created{where or ': it is an existing file'}; "
                             f"choose a directory path")
            return
