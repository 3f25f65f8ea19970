"""The lm-eval task files `kiln eval` runs: kiln's own suites, written into the output directory
with absolute data paths, and the user's task YAMLs, checked where they lie.

Everything runs offline: a task must read local JSON/CSV/Parquet/text files (lm-eval's
`dataset_path: json` + `dataset_kwargs.data_files`) or a local dataset directory; a task that
would download from the Hugging Face Hub is refused with the fix, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from kiln.artifact import atomic_write_text, digest
from kiln.errors import ConfigError

DEMO_DATA = Path(__file__).resolve().parents[2] / "data" / "demo"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


@dataclass
class TaskFile:
    path: Path
    names: list[str]  # the task names it defines
    data: list[Path]  # the local files it reads


def _local_task(name: str, data: Path, **spec) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **spec, "metadata": {"version": 1.0}}


def heldout(data: Path) -> dict:
    """Bits per byte, byte and word perplexity over whole documents (rolling windows)."""
    return _local_task("kiln_heldout", data, output_type="loglikelihood_rolling", doc_to_text="",
                       doc_to_target="{{text}}",
                       metric_list=[
                           {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                           *({"metric": m, "aggregation": "weighted_perplexity", "higher_is_better": False}
                             for m in ("byte_perplexity", "word_perplexity"))])


def demo_choice(data: Path) -> dict:
    return _local_task("kiln_demo_choice", data, output_type="multiple_choice", doc_to_text="{{context}}",
                       doc_to_choice="{{choices}}", doc_to_target="label",
                       metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])


def demo_generate(data: Path) -> dict:
    return _local_task("kiln_demo_generate", data, output_type="generate_until", doc_to_text="{{prompt}}",
                       doc_to_target="{{answer}}",
                       generation_kwargs={"until": [".", "\n"], "max_gen_toks": 8, "do_sample": False},
                       metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                     "ignore_case": True, "regexes_to_ignore": ["\\s", "\\."]}])


def kiln_suites(suites: list[str], heldout_file: str | None, tasks_dir: Path) -> list[TaskFile]:
    """Write kiln's suites' task YAMLs into `tasks_dir` (their data paths absolute)."""
    specs = []
    if "heldout" in suites:
        specs.append(heldout(Path(heldout_file).resolve()))
    if "demo" in suites:
        specs += [demo_choice(DEMO_DATA / "eval_choice.jsonl"), demo_generate(DEMO_DATA / "eval_generate.jsonl")]
    tasks_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for spec in specs:
        path = tasks_dir / f"{spec['task']}.yaml"
        atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
        out.append(TaskFile(path, [spec["task"]], [Path(spec["dataset_kwargs"]["data_files"]["test"])]))
    return out


class _TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML tags (`!function utils.process_docs`) read as plain strings for checking."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)


def _line_of(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(f"{key}:"):
            return number
    return 1


def user_task(path: str) -> TaskFile:
    """Check one user task YAML: it parses, names its task and reads only local files."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"tasks: {path} does not exist; give an lm-eval task YAML (README: `kiln eval`, "
                          f"\"Your own tasks\")")
    text = file.read_text()
    try:
        spec = yaml.load(text, Loader=_TaskLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the task file") from None
    if not isinstance(spec, dict) or not spec.get("task"):
        raise ConfigError(f"{path}:1: an lm-eval task file needs `task: <name>` (and dataset_path, output_type, "
                          f"doc_to_text, doc_to_target); see the templates in the README")
    source = spec.get("dataset_path")
    data_files = (spec.get("dataset_kwargs") or {}).get("data_files")
    where = f"{path}:{_line_of(text, 'dataset_path')}"
    if source in LOCAL_BUILDERS:
        if not data_files:
            raise ConfigError(f"{where}: dataset_path: {source} needs dataset_kwargs.data_files "
                              f"(e.g. {{test: /abs/path/data.jsonl}})")
        if isinstance(data_files, str):
            raise ConfigError(f"{path}:{_line_of(text, 'data_files')}: data_files is a plain path, which gives "
                              f"only a `train` split: write data_files: {{test: {data_files}}} and test_split: test")
        files = [Path(f) for v in data_files.values() for f in ([v] if isinstance(v, str) else v)]
    elif source and Path(source).is_dir():
        files = [Path(source)]
    else:
        raise ConfigError(f"{where}: dataset_path {source!r} is not a local file: kiln eval runs offline (no "
                          f"dataset downloads). Put the data in a local JSONL or Parquet file and write "
                          f"dataset_path: json (or parquet) with dataset_kwargs: {{data_files: {{test: /abs/path}}}}")
    for f in files:
        if not f.is_absolute():
            raise ConfigError(f"{path}:{_line_of(text, 'data_files')}: {f} is relative, and lm-eval resolves it "
                              f"against the working directory: write {(file.parent / f).resolve()}")
        if not f.exists():
            raise ConfigError(f"{path}:{_line_of(text, 'data_files')}: {f} does not exist")
    return TaskFile(file.resolve(), [spec["task"]], files)


def digests(files: list[TaskFile]) -> dict:
    """Task file -> {sha256, data: {file: sha256}}, for eval_summary.json."""
    return {str(f.path): {"sha256": digest(f.path), "data": {str(d): digest(d) for d in f.data if d.is_file()}}
            for f in files}
