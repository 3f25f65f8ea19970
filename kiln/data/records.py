"""JSONL records for fine-tuning and alignment, with their bad ones counted and located.

A bad record (bad JSON, a wrong field, an empty turn, an unknown role, ...) is skipped and
reported as `file:line: reason`; with `strict` the first one stops the run. Either way the
run ends with a report of what was kept, dropped and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from kiln.data import jsonl
from kiln.data.chat import ROLES
from kiln.errors import RecordError


@dataclass
class DataReport:
    """What reading a dataset kept and dropped, with the first bad records located."""

    records: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0
    examples: list[str] = field(default_factory=list)  # "file:line: reason", the first 20

    def drop(self, where: str, reason: str, kind: str, strict: bool) -> None:
        if strict:
            raise RecordError(f"{where}: {reason} (data.strict=false skips and counts such records)")
        self.dropped[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.records} records kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        parts += [f"{n} dropped: {kind}" for kind, n in sorted(self.dropped.items())]
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"records": self.records, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "examples": self.examples}


def read_jsonl(path: str, report: DataReport, strict: bool) -> Iterator[tuple[str, dict]]:
    """(location, record) for every well-formed JSON object line of `path` (.jsonl, .gz, .zst)."""
    def bad(where: str, reason: str, kind: str) -> None:
        report.records += kind != "truncated"
        report.drop(where, reason, kind, strict)

    for where, record in jsonl.records(path, bad):
        report.records += 1
        yield where, record


def messages_of(record: dict, final_role: str | None = "assistant") -> list[dict]:
    """The record's conversation, checked: `messages`, or `prompt` + `completion` as one exchange.
    Raises RecordError naming the problem."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError("'messages' must be a non-empty list of {role, content}")
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise RecordError("expected 'messages', or 'prompt' and 'completion'")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise RecordError(f"turn {i}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise RecordError(f"turn {i} ({m['role']}): empty or non-string content")
    if final_role and messages[-1]["role"] != final_role:
        raise RecordError(f"the conversation ends on a {messages[-1]['role']} turn; it must end on "
                          f"an {final_role} turn, whose text is what the model learns")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
