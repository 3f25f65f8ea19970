"""Constructs NeMo Curator 1.4.0's real dedup workflow objects with kiln's arguments, on CPU.

Importing the workflows needs cuDF and five other GPU packages; their constructors do not. So
this script (run in its own process, so the stand-ins never leak into other tests) serves those
six modules as MagicMocks, imports Curator's real workflow classes, and reports as JSON what
their constructors accept and refuse. Usage: python curator_workflows.py TMPDIR
"""

import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path
from unittest.mock import MagicMock

from kiln.config import CurateConfig
from kiln.curation import gpu


class _Stand_ins(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in gpu.GPU_MODULES:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = MagicMock(name=spec.name)
        module.__path__, module.__spec__ = [], spec
        return module

    def exec_module(self, module):
        pass


def attempt(cls, kwargs) -> str:
    try:
        cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 -- what the constructor says is the result
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def main() -> None:
    tmp = Path(sys.argv[1])
    sys.meta_path.insert(0, _Stand_ins())
    from nemo_curator.stages.deduplication.exact.workflow import ExactDeduplicationWorkflow
    from nemo_curator.stages.deduplication.fuzzy.workflow import FuzzyDeduplicationWorkflow

    results = {}
    for threshold in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
        for num_perm in (16, 32, 64, 128, 256):
            cfg = CurateConfig(inputs=["x.jsonl"], jaccard_threshold=threshold, num_perm=num_perm)
            kwargs = gpu.fuzzy_kwargs(cfg, tmp / "in.jsonl", tmp / "cache", tmp / "fuzzy")
            results[f"fuzzy {threshold} {num_perm}"] = attempt(FuzzyDeduplicationWorkflow, kwargs)
    cfg = CurateConfig(inputs=["x.jsonl"])
    results["exact"] = attempt(ExactDeduplicationWorkflow, gpu.exact_kwargs(cfg, tmp / "in.jsonl", tmp / "exact"))
    # the review's finding, kept as evidence: removal inside the workflows is refused
    results["exact perform_removal"] = attempt(
        ExactDeduplicationWorkflow, {**gpu.exact_kwargs(cfg, tmp / "in.jsonl", tmp / "exact"), "perform_removal": True})
    results["fuzzy perform_removal"] = attempt(FuzzyDeduplicationWorkflow, {
        **gpu.fuzzy_kwargs(cfg, tmp / "in.jsonl", tmp / "cache", tmp / "fuzzy"), "perform_removal": True})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
