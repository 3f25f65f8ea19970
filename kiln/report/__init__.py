"""`kiln report`: one HTML page, readable offline, of what a run or a pipeline did: loss and
validation curves (per data source), the learning-rate schedule and throughput of each training
stage; the curation funnel and fuzzy-dedup cluster sizes; tokens per source; eval scores against a
baseline; each stage's artifact, input digests and timing. Read from the stages' own records only."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.report import collect, page
from kiln.stages import PipelineConfig


def report_pipeline(pipeline: PipelineConfig, output: str | os.PathLike | None = None, partial: bool = False,
                    baseline: str | os.PathLike | None = None) -> Path:
    """The report of a pipeline recipe's stages (default: `<the stages' common root>/report/`)."""
    return page.write(collect.from_pipeline(pipeline, partial=partial), output, baseline)


def report_path(path: str | os.PathLike, output: str | os.PathLike | None = None,
                baseline: str | os.PathLike | None = None) -> Path:
    """The report of one stage's directory (default: `<dir>-report/` beside it) or of a pipeline's
    root directory (default: `<root>/report/`)."""
    return page.write(collect.from_path(Path(path)), output, baseline)
