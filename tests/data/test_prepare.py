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


def test_held_out_documents_are_set_aside_never_tokenized_and_recorded(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from kiln.data.encode import held_out

    texts = [f"{t} Number {i}." for i in range(200) for t in DOCS[:1]]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    summary = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), vocab_size=300,
                                    heldout=0.1))
    aside = [json.loads(line)["text"] for line in (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()]
    expected = [t for t in texts if held_out(t, 0.1)]
    assert aside == expected and 5 < len(aside) < 40  # by the text's hash: about a tenth, in input order
    dataset, hf = IndexedDataset(summary["prefix"]), tok.load(tmp_path / "out" / "tokenizer")
    trained_on = {hf.decode(dataset[i].tolist()[:-1]) for i in range(len(dataset))}
    assert trained_on == set(texts) - set(aside) and summary["documents"] == len(texts) - len(aside)
    assert summary["heldout"] == {"fraction": 0.1, "documents": len(aside),
                                  "path": str(tmp_path / "out" / "heldout.jsonl")}
    assert summary["tokenizer_sample"]["documents"] == len(texts) - len(aside)  # nor learnt by the tokenizer
    without = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "all"), vocab_size=300))
    assert without["heldout"] is None and not (tmp_path / "all" / "heldout.jsonl").exists()


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


# ---- speed path: chunked writer, backends, splits, tokenizer sample ----

# documents that exercise what tokenizer implementations disagree on, if anything
VARIED = ["The kiln was fired at dawn.", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\r\nhere",
          "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F600\U0001F680", "<|endoftext|> in the text",
          "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2  # comment", "1234567890 3.14 -42",
          "x" * 700, "it's we're they've I'm you'll he'd", "\u0000 nul and \u001f", "https://e.com/a?b=c#d"]


def corpus(path, n=400, seed=0, field="text"):
    import random

    rng = random.Random(seed)
    rows = [{field: " ".join(rng.choice(VARIED) for _ in range(rng.randint(1, 6))), "id": i} for i in range(n)]
    if n > 7:
        rows[7][field] = ""  # empty documents are skipped
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level BPE trained by `prepare` on the varied corpus (module-wide: training costs seconds)."""
    root = tmp_path_factory.mktemp("trained")
    src = corpus(root / "train.jsonl", n=600, seed=1)
    prepare(PrepareConfig(inputs=[str(src)], output_dir=str(root / "out"), vocab_size=400))
    return root / "out" / "tokenizer"


def same_bytes(a, b):
    return all(open(f"{a}{s}", "rb").read() == open(f"{b}{s}", "rb").read() for s in (".bin", ".idx"))


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_chunked_writer_writes_the_bytes_of_indexed_dataset_builder(tmp_path, monkeypatch, dtype):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from kiln.data import indexed

    monkeypatch.setattr(indexed, "_STREAM", 7)  # pointers and document indices streamed in many steps
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, size=rng.integers(1, 50)) for _ in range(101)]
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=getattr(np, dtype))
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "ref.idx"))
    with indexed.IndexedWriter(tmp_path / "ours", getattr(np, dtype)) as writer:
        for start in (0, 1, 40, 90):  # uneven chunks of documents
            chunk = docs[start:{0: 1, 1: 40, 40: 90, 90: 101}[start]]
            writer.add(np.concatenate(chunk), [len(d) for d in chunk])
        writer.add(np.empty(0), [])
    assert same_bytes(tmp_path / "ours", tmp_path / "ref")
    assert indexed.read_counts(tmp_path / "ours") == {"documents": 101, "tokens": sum(map(len, docs)),
                                                       "dtype": dtype}


def test_chunked_writer_empty_dataset_and_abort(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from kiln.data.indexed import IndexedWriter

    IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16).finalize(str(tmp_path / "ref.idx"))
    IndexedWriter(tmp_path / "ours", np.uint16).finalize()
    assert same_bytes(tmp_path / "ours", tmp_path / "ref")
    with pytest.raises(RuntimeError), IndexedWriter(tmp_path / "gone", np.uint16) as writer:
        writer.add(np.arange(3), [3])
        raise RuntimeError("stop")
    assert not list(tmp_path.glob("gone*"))


def test_gigatoken_and_tokenizers_backends_write_identical_bytes(tmp_path, trained):
    src = corpus(tmp_path / "in.jsonl")
    runs = {b: prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / b), tokenizer=str(trained)),
                       backend=b) for b in ("gigatoken", "tokenizers", "auto")}
    assert runs["auto"]["backend"] == runs["gigatoken"]["backend"] == "gigatoken"
    assert runs["tokenizers"]["backend"] == "tokenizers"
    assert "equal ids on" in runs["auto"]["backend_check"]
    for b in ("tokenizers", "auto"):
        assert same_bytes(runs[b]["prefix"], runs["gigatoken"]["prefix"])
    assert runs["gigatoken"]["documents"] == 399  # the empty one skipped
    manifest = json.loads((tmp_path / "auto" / "kiln.json").read_text())
    assert manifest["summary"]["backend"] == "gigatoken" and manifest["summary"]["tokenizer_sample"] is None


def test_bounding_gigatokens_cache_changes_no_byte(tmp_path, monkeypatch, trained):
    from kiln.data import encode

    src = corpus(tmp_path / "in.jsonl")
    first = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "a"), tokenizer=str(trained)))
    monkeypatch.setattr(encode, "CACHE_BYTES", -(1 << 40))  # rebuilt after every block
    monkeypatch.setattr(encode, "BLOCK", 2048)
    bounded = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "b"), tokenizer=str(trained)))
    assert first["cache_resets"] == 0 and bounded["cache_resets"] > 10
    assert same_bytes(first["prefix"], bounded["prefix"])


def test_ids_equal_the_reference_tokenizer_document_by_document(tmp_path, trained):
    """What megatron-core reads back: each document's ids are tokenizers' ids plus one EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    src = corpus(tmp_path / "in.jsonl", n=60)
    summary = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), tokenizer=str(trained)))
    reference = Tokenizer.from_file(str(trained / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    texts = [t for t in texts if t]
    dataset = IndexedDataset(summary["prefix"])
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == reference.encode(text, add_special_tokens=False).ids + [summary["eod_id"]]


def test_auto_falls_back_to_tokenizers_when_gigatoken_cannot_load_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[SEP]": 1, **{w: i + 2 for i, w in enumerate("the kiln was fired at dawn .".split())}}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(
        str(tmp_path / "wp"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the kiln was fired at dawn."}] * 3)
    summary = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"),
                                    tokenizer=str(tmp_path / "wp")))
    assert summary["backend"] == "tokenizers" and "gigatoken cannot load it" in summary["backend_check"]
    assert summary["tokens"] == 3 * 8


def test_auto_falls_back_to_tokenizers_when_the_ids_differ_on_the_check_sample(tmp_path, monkeypatch, trained):
    from kiln.data.encode import Encoder

    real = Encoder._encode_giga

    def off_by_one(self, texts):
        ids, lengths = real(self, texts)
        return ids + 1, lengths

    monkeypatch.setattr(Encoder, "_encode_giga", off_by_one)
    src = corpus(tmp_path / "in.jsonl", n=50)
    summary = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), tokenizer=str(trained)))
    assert summary["backend"] == "tokenizers" and "ids differ on the check sample" in summary["backend_check"]
    reference = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "ref"), tokenizer=str(trained)),
                        backend="tokenizers")
    assert same_bytes(summary["prefix"], reference["prefix"])


def test_splits_tokenized_apart_and_merged_with_add_index_equal_the_local_prepare(tmp_path, trained):
    """What the Ray engine does: one task per split, merged in order by megatron-core's builder."""
    import gzip

    from kiln.data import jsonl
    from kiln.data.encode import Encoder, tokenize_split
    from kiln.data.indexed import merge
    from kiln.data.splits import plan

    (tmp_path / "in").mkdir()
    corpus(tmp_path / "in" / "a.jsonl", n=300, seed=2)
    corpus(tmp_path / "in" / "c.jsonl", n=5, seed=3)
    b = corpus(tmp_path / "b.jsonl", n=200, seed=4)
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress(b.read_bytes()))  # compressed: one split
    local = prepare(PrepareConfig(inputs=[str(tmp_path / "in")], output_dir=str(tmp_path / "local"),
                                  tokenizer=str(trained)))
    splits = plan(jsonl.files([str(tmp_path / "in")]), split_bytes=4096)
    assert len(splits) > 10 and any(s.start > 0 for s in splits)
    backend = Encoder(trained).decide(VARIED)  # the driver decides once; every task takes its choice
    assert backend == "gigatoken"
    parts = []
    for i, split in enumerate(splits):
        result = tokenize_split(split, trained, "text", tmp_path / f"part{i}", batch_size=7, backend=backend)
        assert result["backend"] == backend
        parts.append(tmp_path / f"part{i}")
    counts = merge(parts, tmp_path / "merged")
    assert same_bytes(tmp_path / "merged", local["prefix"])
    assert counts == {"documents": local["documents"], "tokens": local["tokens"]}


def test_block_boundaries_keep_line_numbers(tmp_path, monkeypatch, trained):
    """Blocks smaller than a line: errors still name the right line, and the output is unchanged."""
    from kiln.data import encode

    lines = [json.dumps({"text": t}) for t in VARIED] + ["", "   ", '{"text": "crlf"}\r',
                                                          '{"text": "json, not orjson, reads NaN", "score": NaN}']
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    whole = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "a"), tokenizer=str(trained)))
    monkeypatch.setattr(encode, "BLOCK", 16)
    small = prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "b"), tokenizer=str(trained)))
    assert same_bytes(whole["prefix"], small["prefix"]) and small["documents"] == len(VARIED) + 2
    src.write_text("\n".join(lines + ['{"text": "\\ud800 lone"}']) + "\n")
    with pytest.raises(InputError, match=rf"in\.jsonl:{len(lines) + 1}: field 'text' holds an unpaired surrogate"):
        prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "c"), tokenizer=str(trained)))
    src.write_text("\n".join(lines + ['{"text": "ok"} {"text": "two"}']))  # no final newline
    with pytest.raises(InputError, match=rf"in\.jsonl:{len(lines) + 1}: not valid JSON \(Extra data\)"):
        prepare(PrepareConfig(inputs=[str(src)], output_dir=str(tmp_path / "d"), tokenizer=str(trained)))


def test_reader_agrees_with_jsonl_records_on_every_split(tmp_path):
    """Line numbers and records of kiln.data.encode's block reader are those of jsonl.records,
    for whole files and for byte ranges."""
    from kiln.data import encode, jsonl
    from kiln.data.splits import plan

    src = corpus(tmp_path / "in.jsonl", n=150, seed=5)
    for split in plan([src], split_bytes=1000):
        expected = [(w, r["text"]) for w, r in jsonl.records(src, split=split) if r["text"]]
        got = []
        for first, lines, _ in encode._blocks(split, block=333):
            texts = encode._texts(split.path, first, lines, "text")
            got += [(f"{split.path}:{first + i}", json.loads(raw)["text"]) for i, raw in enumerate(lines)
                    if json.loads(raw)["text"]]
            assert [t for _, t in got[-len(texts):]] == texts if texts else True
        assert got == expected


def test_a_trained_tokenizer_reads_a_bounded_deterministic_sample(tmp_path):
    (tmp_path / "in").mkdir()
    big = corpus(tmp_path / "in" / "big.jsonl", n=900, seed=6)
    small = corpus(tmp_path / "in" / "small.jsonl", n=100, seed=7)
    sizes = {p.name: p.stat().st_size for p in (big, small)}
    limit_mb = 0.02  # 20 KiB of the ~100 KiB
    runs = [prepare(PrepareConfig(inputs=[str(tmp_path / "in")], output_dir=str(tmp_path / f"o{i}"), vocab_size=300,
                                  tokenizer_sample_mb=limit_mb)) for i in range(2)]
    sample = runs[0]["tokenizer_sample"]
    limit = int(limit_mb * 2**20)
    assert sample["limit_mb"] == limit_mb and not sample["whole_input"]
    by_name = {f["path"].rsplit("/", 1)[1]: f for f in sample["files"]}
    longest = max(len(line) + 1 for p in (big, small) for line in p.read_bytes().split(b"\n"))
    for name, size in sizes.items():
        share = limit * size // sum(sizes.values())
        assert share <= by_name[name]["bytes"] < share + longest  # the head, to the first line end past its share
    assert sample["bytes"] == sum(f["bytes"] for f in sample["files"]) < limit + 2 * longest
    trained = [(tmp_path / f"o{i}/tokenizer/tokenizer.json").read_bytes() for i in range(2)]
    assert trained[0] == trained[1]
    manifest = json.loads((tmp_path / "o0" / "kiln.json").read_text())
    assert manifest["summary"]["tokenizer_sample"] == sample and manifest["summary"]["backend"] == "gigatoken"
    # everything is read when the inputs are smaller than the limit
    whole = prepare(PrepareConfig(inputs=[str(tmp_path / "in")], output_dir=str(tmp_path / "w"), vocab_size=300))
    assert whole["tokenizer_sample"]["whole_input"]
    assert whole["tokenizer_sample"]["bytes"] == sum(sizes.values())
    assert whole["tokenizer_sample"]["documents"] == whole["documents"]


def test_describe_reads_tokenizer_json_like_transformers(tmp_path, trained):
    """The transformers-free path gives transformers' vocabulary size and EOD; a tokenizer it
    cannot vouch for goes through transformers."""
    described = tok.describe(trained)
    hf = tok.load(trained)
    assert described.via == "tokenizer.json"
    assert (described.vocab_size, described.eod_id) == (len(hf), tok.eod_id(hf))
    assert described.backend.to_str() == hf.backend_tokenizer.to_str()
    config = json.loads((trained / "tokenizer_config.json").read_text())
    other = tmp_path / "other"
    tok.copy(trained, other)
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert tok._describe_directly(other) is None  # a class that may rebuild its tokenizer: transformers loads it
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad-not-added>"}))
    fallback, hf = tok.describe(other), tok.load(other)
    assert fallback.via == "transformers" and fallback.vocab_size == len(hf) == len(tok.load(trained)) + 1
