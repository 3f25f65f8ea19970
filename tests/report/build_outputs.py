"""Build a small real pipeline's outputs for the report tests, every stage through kiln's own launch
path (`kiln.launch.driver.launch_stage`, in this process: each stage here runs as one rank), so the
fixture skips NeMo-Run's per-stage start-up and the whole chain takes about a minute.

    python tests/report/build_outputs.py ROOT

The chain: curate (a corpus made to exercise every step of the funnel) -> prepare -> pretrain on a
blend of two sources (per-source validation loss) -> eval on the checkpoint, gated on a baseline.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from kiln.launch.config import LaunchConfig
from kiln.launch.driver import launch_stage
from kiln.pipeline import plan
from kiln.recipes.pipeline import tiny
from kiln.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def corpus(path: Path) -> None:
    """The demo corpus plus what curation removes: exact copies, near-duplicates (one word changed),
    documents too short for the word-count filter."""
    docs = [json.loads(line)["text"] for line in (ROOT / "data/demo/corpus.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    extra = [docs[i] for i in range(12)]  # exact
    for i in range(20, 32):  # near: the same words but one; the first four twice (clusters of three)
        for word in ("lantern", "ladder")[: 2 if i < 24 else 1]:
            words = docs[i].split()
            words[len(words) // 2] = word
            extra.append(" ".join(words))
    extra += [docs[40], docs[40]]  # a three-document exact cluster
    extra += [" ".join(rng.sample(docs[50 + i].split(), 12)) for i in range(8)]  # too short
    with open(path, "w") as f:
        for n, text in enumerate(docs + extra):
            f.write(json.dumps({"id": f"doc-{n}", "text": text}) + "\n")


def pipeline(root: Path, baseline: Path | None = None):
    p = tiny(root=str(root))
    p.curate.inputs = [str(root / "raw.jsonl")]
    # two weighted sources (the same prefix twice): validation scores each, as val_loss/<source>
    p.links.pop("pretrain.data.blend")
    prefix = f"{root}/data/corpus_text_document"
    p.pretrain.data.blend = [0.7, prefix, 0.3, prefix]
    p.pretrain.parallel.tp, p.pretrain.parallel.world_size = 1, None
    p.pretrain.train.steps, p.pretrain.train.eval_interval = 6, 3
    p.pretrain.schedule.warmup_steps = 2
    p.pretrain.checkpoint.save_interval = 0
    p.pretrain.logging.tensorboard = p.pretrain.logging.progress_bar = False
    p.sft = p.dpo = p.rm = p.rlhf = p.convert = p.export = None
    p.eval.source = p.pretrain.run_dir  # scored on kiln's engine, no conversion needed
    p.eval.suites, p.eval.limit = ["heldout"], 8
    p.eval.baseline = str(baseline) if baseline else None
    p.eval.tolerance = 0.5
    return p


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    corpus(root / "raw.jsonl")
    # an earlier run's summary for the gate to compare with (a model that scored worse)
    baseline = root / "baseline_eval_summary.json"
    baseline.write_text(json.dumps({"metrics": {"kiln_heldout": {
        "bits_per_byte": {"value": 2.5, "stderr": 0.03, "higher_is_better": False},
        "byte_perplexity": {"value": 5.6, "stderr": 0.1, "higher_is_better": False}}}}))
    for stage in plan(pipeline(root, baseline)):
        if stage.runs and launch_stage(STAGES[stage.name], stage.cfg, LaunchConfig()) != 0:
            sys.exit(f"{stage.name} failed")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
