"""Chat templates and data records: the loss mask is exactly the assistant text, and bad
records are counted with their file and line (or stop the run with data.strict)."""

from __future__ import annotations

import json

import pytest

from kiln.data.chat import BUILTIN, ChatFormatter, TemplateError
from kiln.data.preference import encode_pairs
from kiln.data.records import DataReport, RecordError
from kiln.data.sft import Example, block_causal_mask, build_sample, encode_file, pack

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who is Ada?"},
    {"role": "assistant", "content": "Ada is a potter."},
    {"role": "user", "content": "Where?"},
    {"role": "assistant", "content": "Near the harbour."},
]


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from kiln.data.tokenizer import load

    return load(demo_data / "tokenizer")


@pytest.mark.parametrize("template", sorted(BUILTIN))
def test_mask_is_exactly_the_assistant_turns(tokenizer, template):
    encoded = ChatFormatter(tokenizer, template).encode(CONVERSATION)
    masked = tokenizer.decode([t for t, m in zip(encoded.tokens, encoded.loss_mask, strict=True) if m])
    unmasked = tokenizer.decode([t for t, m in zip(encoded.tokens, encoded.loss_mask, strict=True) if not m])
    for turn in CONVERSATION:
        assert (turn["content"] in masked) == (turn["role"] == "assistant"), (template, masked)
    assert "Who is Ada?" in unmasked and "Ada is a potter." not in unmasked
    # the mask adds nothing the template would not render: tokens decode to the template's text
    assert tokenizer.decode(encoded.tokens) == ChatFormatter(tokenizer, template).render(CONVERSATION)


def test_tokenizer_template_and_rewriting_templates(tokenizer):
    tokenizer.chat_template = BUILTIN["chatml"]
    assert ChatFormatter(tokenizer, "tokenizer").encode(CONVERSATION).loss_mask
    # a template that renders only the last two turns rewrites history: no honest mask exists
    rewriting = "{% for m in messages[-2:] %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.chat_template = rewriting
    with pytest.raises(TemplateError, match="changes the text of earlier turns"):
        ChatFormatter(tokenizer, "tokenizer").encode(CONVERSATION)
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="has no chat_template"):
        ChatFormatter(tokenizer, "tokenizer")


def test_bad_records_are_counted_with_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "x " * 400, "completion": "y"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    report = DataReport()
    examples = encode_file(str(path), ChatFormatter(tokenizer, "chatml"), 64, report, strict=False)
    assert len(examples) == 1 and report.kept == 1 and report.records == 6
    text = "\n".join(report.examples)
    assert f"{path}:2: turn 1 (assistant): empty" in text
    assert f"{path}:3: turn 0: unknown role 'robot'" in text
    assert f"{path}:4: the conversation ends on a user turn" in text
    assert f"{path}:5: the prompt alone fills" in text
    assert f"{path}:6: not valid JSON" in text
    with pytest.raises(RecordError, match=f"{path}:2"):
        encode_file(str(path), ChatFormatter(tokenizer, "chatml"), 64, DataReport(), strict=True)


def test_preference_pairs_reject_identical_answers(tokenizer, tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps({"prompt": "Who?", "chosen": "Ada.", "rejected": "Ada."}) + "\n"
                    + json.dumps({"prompt": "Who?", "chosen": "Ada.", "rejected": "Bruno."}) + "\n")
    report = DataReport()
    pairs = encode_pairs(str(path), ChatFormatter(tokenizer, "chatml"), 64, report, strict=False)
    assert len(pairs) == 1 and report.dropped == {"chosen_equals_rejected": 1}
    assert report.examples[0].startswith(f"{path}:1: 'chosen' equals 'rejected'")


def test_packing_restarts_positions_and_blocks_attention():
    examples = [Example(list(range(n + 1)), [0] + [1] * n) for n in (5, 3, 7, 2)]
    bins = pack(examples, 10)
    assert sorted(sum(e.positions for e in b) for b in bins) == [7, 10]  # FFD: 7+3, 5+2
    sample = build_sample(bins[0], 10, pad_id=0)
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    mask = block_causal_mask([sample["segments"]], 10)[0, 0]
    assert not mask[8, 7] and mask[8, 6] and mask[3, 4]  # own segment, causal; nothing across
