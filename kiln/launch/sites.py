"""Site profiles: a team's cluster settings (account, partition, image, mounts) in
slurm/sites/<name>.yaml, chosen with --site, so recipes stay portable."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from kiln import overrides
from kiln.errors import ConfigError
from kiln.launch.config import LaunchConfig

SITES_DIR = Path(__file__).resolve().parents[2] / "slurm" / "sites"


def site_path(name: str) -> Path:
    directory = Path(os.environ.get("KILN_SITES_DIR", SITES_DIR))
    path = Path(name) if name.endswith((".yaml", ".yml")) else directory / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"
        raise ConfigError(f"--site {name}: {path} does not exist (sites in {directory}: {known})")
    return path


def load_site(name: str) -> LaunchConfig:
    """A LaunchConfig from a site profile: a YAML mapping of LaunchConfig fields."""
    path = site_path(name)
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return overrides.from_dict(LaunchConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
