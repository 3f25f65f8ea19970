"""`kiln prepare engine=ray` on a real two-node Ray cluster: one task per input split, merged
with megatron-core's add_index into the local engine's .bin/.idx, byte for byte."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from kiln.config import PrepareConfig, RayConfig
from kiln.data import indexed
from kiln.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_nodes_write_the_local_engines_dataset_and_a_list_of_prefixes(ray_two_nodes, tmp_path):
    plain = tmp_path / "a.jsonl"
    shutil.copy(ROOT / "data/demo/corpus.jsonl", plain)  # cut into several splits
    packed = tmp_path / "b.jsonl.gz"  # one split
    packed.write_bytes(gzip.compress((ROOT / "data/demo/corpus.jsonl").read_bytes()[:50_000].rsplit(b"\n", 1)[0]))
    inputs = [str(plain), str(packed)]

    def config(out: str, **kw) -> PrepareConfig:
        return PrepareConfig(inputs=inputs, output_dir=str(tmp_path / out), vocab_size=1024, heldout=0.1, **kw)

    local = prepare(config("local"))
    ray_cfg = RayConfig(address=ray_two_nodes.address, split_mb=0.05)
    merged = prepare(config("ray", engine="ray", ray=ray_cfg))
    name = "corpus_text_document"
    for suffix in (".bin", ".idx"):
        written = (tmp_path / "ray" / f"{name}{suffix}").read_bytes()
        assert written == (tmp_path / "local" / f"{name}{suffix}").read_bytes()
    for path in (tmp_path / "local" / "tokenizer").iterdir():
        assert (tmp_path / "ray" / "tokenizer" / path.name).read_bytes() == path.read_bytes()
    assert (merged["documents"], merged["tokens"]) == (local["documents"], local["tokens"])
    # the documents set aside for evaluation: the same ones, in the same order, whatever the splits
    assert (tmp_path / "ray" / "heldout.jsonl").read_bytes() == (tmp_path / "local" / "heldout.jsonl").read_bytes()
    assert merged["heldout"]["documents"] == local["heldout"]["documents"] > 0
    assert merged["engine"]["splits"] >= 5 and merged["engine"]["nodes"] == 2
    assert merged["tokenizer_sample"] == local["tokenizer_sample"]
    assert not Path(f"{tmp_path / 'ray'}.work").exists()

    kept = prepare(config("parts", engine="ray", ray=ray_cfg, merge=False))
    assert len(kept["prefixes"]) == merged["engine"]["splits"]
    # megatron's IndexedDataset is not opened here: with Ray initialised in the same process, the
    # interpreter crashed at exit after reading one; the parts are checked by their bytes instead
    parts = [indexed.read_counts(prefix) for prefix in kept["prefixes"]]
    assert sum(p["documents"] for p in parts) == local["documents"] and min(p["documents"] for p in parts) > 0
    joined = b"".join(Path(f"{prefix}.bin").read_bytes() for prefix in kept["prefixes"])
    assert joined == (tmp_path / "local" / f"{name}.bin").read_bytes()


@pytest.mark.slow
def test_a_cluster_kiln_starts_is_gone_when_the_run_ends(tmp_path, monkeypatch):
    """No ray.address and no $RAY_ADDRESS: kiln starts a local cluster and stops every process of it."""
    import os

    import psutil

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = {p.pid for p in psutil.process_iter()}
    summary = prepare(PrepareConfig(inputs=[str(ROOT / "data/demo/corpus.jsonl")], output_dir=str(tmp_path / "out"),
                                    vocab_size=1024, engine="ray", ray=RayConfig(num_cpus=1, split_mb=0.1)))
    assert summary["engine"]["tasks"] >= 3 and summary["engine"]["nodes"] == 1
    left = [(p.pid, p.info["name"]) for p in psutil.process_iter(["name", "cmdline", "ppid"])
            if p.pid not in before and p.pid != os.getpid() and p.info["ppid"] != os.getpid()
            and ("ray" in p.info["name"].lower() or "ray" in " ".join(p.info["cmdline"] or [])[:200])]
    assert not left, left
