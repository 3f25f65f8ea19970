"""`kiln prepare`: JSONL -> megatron-core indexed dataset, one EOD per document, atomic output."""

from __future__ import annotations

import json

import pytest

from kiln.config import PrepareConfig
from kiln.data import tokenizer as tok
from kiln.data.prepare import InputError, prepare

DOCS = ["The kiln was fired at dawn.", "Glaze the bowls before noon.", "Ash settles on the shelf."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_documents_round_trip_with_one_eod_each(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS * 20])
    summary = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), vocab_size=300))
    dataset = IndexedDataset(summary["prefix"])
    hf = tok.load(tmp_path / "out" / "tokenizer")
    assert len(dataset) == summary["documents"] == 60
    for i, text in enumerate(DOCS):
        ids = dataset[i].tolist()
        assert ids[-1] == summary["eod_id"] and summary["eod_id"] not in ids[:-1]
        assert hf.decode(ids[:-1]) == text
    assert sum(len(dataset[i]) for i in range(len(dataset))) == summary["tokens"]
    manifest = json.loads((tmp_path / "out" / "kiln.json").read_text())
    assert manifest["stage"] == "prepare" and manifest["inputs"][0]["digest"]


def test_existing_tokenizer_is_reused(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"body": t} for t in DOCS])
    first = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "a"), vocab_size=300,
                                  text_field="body"))
    second = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "b"), text_field="body",
                                   tokenizer=first["tokenizer"]))
    assert second["tokens"] == first["tokens"] and second["vocab_size"] == first["vocab_size"]


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "ok"}', '{"text": broken}'], r"in\.jsonl:3: not valid JSON"),
    (['{"text": "ok"}', '{"body": "no text"}'], r"in\.jsonl:2: field 'text' is missing or not a string"),
    (['{"text": 5}'], r"in\.jsonl:1: field 'text' is missing or not a string"),
])
def test_bad_records_name_file_and_line_and_leave_nothing(tmp_path, lines, message):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message):
        prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), vocab_size=300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_invalid_utf8_is_reported(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"in\.jsonl:2: invalid UTF-8"):
        prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), vocab_size=300))


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_compressed_file_names_the_last_good_line_and_leaves_nothing(tmp_path, suffix):
    """A copy cut short (or a full disk) ends a compressed stream inside a frame: gzip raises
    EOFError and zstandard's stream reader ends silently; both are one located error here."""
    import gzip

    import zstandard

    n = 20000  # zstd emits whole blocks (128 KB): enough of them that half the file holds some
    data = "".join(json.dumps({"text": f"{DOCS[i % 3]} {i}"}) + "\n" for i in range(n)).encode()
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    src = tmp_path / f"in{suffix}"
    src.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError, match=rf"in{suffix}:\d+: truncated: the compressed file ends early after line "
                                         rf"\d+") as err:
        prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), vocab_size=300))
    last_good = int(str(err.value).split("after line ")[1].split()[0].rstrip(";"))
    assert 1000 < last_good < n
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no partial output

    whole = tmp_path / "whole" / f"in{suffix}"  # the same file complete reads every line
    whole.parent.mkdir()
    whole.write_bytes(packed)
    assert prepare(PrepareConfig(inputs=[str(whole)], output_dir=str(tmp_path / "o2"), vocab_size=300))[
        "documents"] == n


def test_an_output_path_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    from kiln.config import ConfigError

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(ConfigError, match="output_dir=.*taken cannot be created: it is an existing file"):
        prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "taken"), vocab_size=300))


def test_a_directory_input_reads_its_jsonl_shards_only(tmp_path):
    """What a pipeline links from curate: its output directory, whose report and manifest are JSON
    files but not documents."""
    shards = tmp_path / "curated"
    shards.mkdir()
    write_jsonl(shards / "curated_00001.jsonl", [{"text": t} for t in DOCS])
    write_jsonl(shards / "curated_00000.jsonl", [{"text": t} for t in reversed(DOCS)])
    (shards / "curation_report.json").write_text('{"documents_in": 6}')
    (shards / "kiln.json").write_text("{}")
    summary = prepare(PrepareConfig(inputs=[str(shards)], output_dir=str(tmp_path / "out"), vocab_size=300))
    assert summary["documents"] == 6
    inputs = json.loads((tmp_path / "out" / "kiln.json").read_text())["inputs"]
    assert [i["path"].rsplit("/", 1)[1] for i in inputs] == ["curated_00000.jsonl", "curated_00001.jsonl"]
