"""The report page: one self-contained index.html (figures inlined as base64 PNG, styles inline, no
script, nothing fetched) with each figure also written beside it as <id>.png, and report.json
listing them. The directory is written whole under a temporary name and renamed into place."""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path

import kiln
from kiln import pipeline as pl
from kiln.artifact import atomic_dir
from kiln.errors import ReportError
from kiln.report import collect, figures
from kiln.report.collect import Subject

INDEX = "index.html"
MARKER = "report.json"  # what tells a directory kiln report may replace from any other

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.meta, figcaption, .note { color: #666; font-size: .85rem; }
figure { margin: 1rem 0 1.6rem; } img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: .82rem; width: 100%; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .3rem .45rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } code { font-size: .78rem; word-break: break-all; }
.done { color: #2e7d32; } .stale, .regressed { color: #c62828; } .progress { color: #ef6c00; }
nav a { margin-right: 1rem; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _figure(fig: figures.Figure) -> str:
    data = base64.b64encode(fig.png).decode()
    return (f'<figure id="figure-{fig.id}"><img id="fig-{fig.id}" alt="{_e(fig.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(fig.caption)}</figcaption></figure>')


def _state(state: str) -> str:
    kind = "done" if state == "done" else "progress" if state.startswith("in progress") else "stale"
    return f'<span class="{kind}">{_e(state)}</span>'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _digests(records: list[dict]) -> str:
    unique = dict.fromkeys((r["path"], r["digest"][:16]) for r in records)  # a blend may name one file twice
    return "<br>".join(f"<code>{_e(path)}</code> <code>{_e(digest)}</code>" for path, digest in unique)


def stage_table(subject: Subject) -> str:
    """Each stage's artifact, what it read (paths and content digests), what later stages recorded
    reading from it, and when it ran."""
    read_by: dict[str, list[dict]] = {}
    for stage in subject.stages:
        for record in (stage.manifest or {}).get("inputs", []):
            for other in subject.stages:
                if Path(record["path"]).is_relative_to(other.path.resolve()) and other is not stage:
                    read_by.setdefault(other.name, []).append({**record, "path": f"{record['path']} ({stage.name})"})
    rows = ["<tr><th>stage</th><th>state</th><th>artifact</th><th>summary</th><th>started / ended</th>"
            "<th>took</th><th>inputs (sha256)</th><th>read downstream (sha256, by)</th></tr>"]
    for s in subject.stages:
        m = s.manifest or {}
        rows.append(
            f"<tr><td>{_e(s.name)}</td><td>{_state(s.state)}</td><td><code>{_e(s.path)}</code></td>"
            f"<td>{_e(pl.summary_line(s.name, m) if m else '')}</td>"
            f"<td>{_e(m.get('started', ''))}<br>{_e(m.get('ended', ''))}</td><td>{_duration(s.seconds)}</td>"
            f"<td>{_digests(m.get('inputs', []))}</td><td>{_digests(read_by.get(s.name, []))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def eval_table(summary: dict) -> str:
    checks = {(c["task"], c["metric"]): c for c in (summary.get("gate") or {}).get("checks", [])}
    rows = ["<tr><th>task</th><th>metric</th><th>value</th><th>± stderr</th><th>baseline</th><th>verdict</th></tr>"]
    for task, metrics in summary.get("metrics", {}).items():
        for name, m in metrics.items():
            check = checks.get((task, name))
            verdict = ("" if check is None else '<span class="regressed">regressed</span>' if check["regressed"]
                       else '<span class="done">within tolerance</span>')
            stderr = f"{m['stderr']:.4f}" if isinstance(m.get("stderr"), (int, float)) else "-"
            rows.append(f"<tr><td>{_e(task)}</td><td>{_e(name)}</td><td>{m['value']:.4f}</td><td>{stderr}</td>"
                        f"<td>{'' if check is None else format(check['baseline'], '.4f')}</td><td>{verdict}</td></tr>")
    gate = summary.get("gate")
    note = (f"<p class=note>baseline: <code>{_e(gate['baseline'])}</code>, tolerance {gate['tolerance']:g}</p>"
            if gate else "")
    return note + "<table>" + "".join(rows) + "</table>"


def build(subject: Subject, baseline: Path | None = None) -> tuple[str, list[figures.Figure]]:
    """(the page's HTML, its figures)."""
    training = [s for s in subject.stages if s.metrics]
    sections: list[tuple[str, str, list[figures.Figure], str]] = []  # id, heading, figures, extra HTML
    names = [s.name for s in training]  # a pipeline root may hold two runs of one stage: ids stay unique
    drawn = [figures.loss(s, s.name if names.count(s.name) == 1 else f"{s.name}-{s.path.name}") for s in training]
    drawn += [figures.learning_rate(training), figures.throughput(training)]
    sections.append(("training", "Training", [f for f in drawn if f], "" if training else
                     "<p class=note>no training stage in this report</p>"))
    curate = subject.first("curate")
    data_figs = []
    if curate is not None:
        report_file = curate.path / "curation_report.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else curate.manifest["summary"]
        data_figs += [figures.funnel(report), figures.cluster_sizes(report)]
    data_figs.append(figures.tokens(collect.sources(subject)))
    sections.append(("data", "Data", [f for f in data_figs if f], ""))
    summary = collect.eval_comparison(subject, baseline)
    if summary is not None:
        sections.append(("eval", "Evaluation", [f for f in [figures.eval_scores(summary)] if f], eval_table(summary)))
    sections.append(("stages", "Stages: artifacts, digests, timing", [], stage_table(subject)))
    sections = [s for s in sections if s[2] or s[3]]
    all_figs = [f for s in sections for f in s[2]]
    body = [f"<h1>kiln report: {_e(subject.title)}</h1>",
            f"<p class=meta>written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by kiln {_e(kiln.__version__)}; "
            f"{len(subject.stages)} stage(s), {len(all_figs)} figure(s)</p>",
            "<nav>" + "".join(f'<a href="#{sid}">{_e(h)}</a>' for sid, h, _, _ in sections) + "</nav>"]
    for sid, heading, figs, extra in sections:
        body.append(f'<section id="{sid}"><h2>{_e(heading)}</h2>' + "".join(map(_figure, figs)) + extra + "</section>")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>kiln report: {_e(subject.title)}'
            f"</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    return page, all_figs


def _checked_output(output: Path) -> Path:
    """The output directory, refused before any drawing when it cannot be written or holds something
    that is not an earlier report (which a new one replaces whole)."""
    output = Path(os.path.abspath(output))
    if output.exists() and not (output / MARKER).is_file():
        kind = "a file" if not output.is_dir() else "a directory that is not a kiln report"
        raise ReportError(f"--output {output} is {kind}; kiln report replaces only an earlier report there: "
                          f"choose another --output")
    blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ReportError(f"cannot write the report to {output}: {blocking} is a file, not a directory; "
                          f"choose another --output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        where = exc.filename or output.parent
        raise ReportError(f"cannot write the report to {output}: {exc.strerror or exc} ({where}); "
                          f"choose a writable directory with --output") from None
    return output


def write(subject: Subject, output: str | os.PathLike | None = None, baseline: str | os.PathLike | None = None) -> Path:
    """Write the report directory and return its index.html."""
    output = _checked_output(Path(output) if output else subject.default_output)
    page, figs = build(subject, Path(baseline) if baseline else None)
    with atomic_dir(output) as tmp:
        for fig in figs:
            (tmp / f"{fig.id}.png").write_bytes(fig.png)
        (tmp / INDEX).write_text(page)
        listing = {"title": subject.title, "kiln_version": kiln.__version__, "figures": [f.id for f in figs],
                   "stages": {s.name: str(s.path) for s in subject.stages}}
        (tmp / MARKER).write_text(json.dumps(listing, indent=2) + "\n")
    return output / INDEX

