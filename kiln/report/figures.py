"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state), each
returned as PNG bytes under a stable id the page and the tests find it by."""

from __future__ import annotations

import io
from dataclasses import dataclass

from kiln.report.collect import Source, StageRecord, series, validation_keys

SIZE = (7.5, 3.6)  # inches, at DPI: 825 x 396 pixels
DPI = 110


@dataclass
class Figure:
    id: str  # the <img id="fig-<id>"> and <id>.png
    title: str
    caption: str
    png: bytes


def _new(size=SIZE, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _png(fig) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def loss(stage: StageRecord, label: str | None = None) -> Figure | None:
    """Training loss and validation loss, overall and per data source, of one training stage
    (`label`: the stage's name in the figure id, when two stages share a name)."""
    steps, values = series(stage.metrics, "loss")
    keys = validation_keys(stage.metrics)
    if not steps and not keys:
        return None
    fig, (ax,) = _new()
    if steps:
        ax.plot(steps, values, label="loss (train)", color="C0", linewidth=1.4)
    for n, key in enumerate(keys):
        vs, vv = series(stage.metrics, key)
        overall = key == "val_loss"
        ax.plot(vs, vv, marker="o", markersize=4, linewidth=2.0 if overall else 1.0,
                linestyle="-" if overall else "--", color="C1" if overall else f"C{n + 2}",
                label=key.replace("val_loss/", "val_loss: "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage.name}: loss")
    ax.legend(fontsize=8)
    sources = [k.split("/", 1)[1] for k in keys if "/" in k]
    caption = (f"{len(steps)} logged steps; validation every eval_interval steps"
               + (f", per source: {', '.join(sources)}" if sources else "") + f" ({stage.path}/metrics.jsonl)")
    return Figure(f"loss-{label or stage.name}", f"{stage.name}: training and validation loss", caption, _png(fig))


def _per_stage(stages: list[StageRecord], key: str, fid: str, title: str, ylabel: str, caption: str,
               log: bool = False) -> Figure | None:
    drawn = [(s, *series(s.metrics, key)) for s in stages]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return None
    fig, (ax,) = _new()
    for n, (stage, steps, values) in enumerate(drawn):
        ax.plot(steps, values, label=stage.name, color=f"C{n}", marker="." if len(steps) < 40 else None)
    if log and all(v > 0 for _, _, vs in drawn for v in vs):
        ax.set_yscale("log")
    ax.set_xlabel("step (of each stage)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return Figure(fid, title, caption, _png(fig))


def learning_rate(stages: list[StageRecord]) -> Figure | None:
    return _per_stage(stages, "lr", "learning-rate", "learning-rate schedule", "learning rate",
                      "the rate each optimizer step applied (warm-up, then the schedule's decay)")


def throughput(stages: list[StageRecord]) -> Figure | None:
    return _per_stage(stages, "tokens_per_s", "throughput", "throughput", "tokens / s",
                      "training tokens per second of wall time, per step (the first steps include warm-up)")


def funnel(report: dict) -> Figure:
    """Documents in -> removed by bad input, each filter, exact and fuzzy dedup -> documents out."""
    rows = [("documents in", report["documents_in"], "in")]
    bad = sum(report["bad_input"]["counts"].values())
    if bad:
        rows.append(("bad input", -bad, "out"))
    filters = report.get("filters") or {}
    rows += [(f"filter: {name}", -count, "out") for name, count in filters.get("removed_by", {}).items()]
    for key, label in (("exact_dedup", "exact dedup"), ("fuzzy_dedup", "fuzzy dedup"), ("gpu_dedup", "GPU dedup")):
        if report.get(key):
            rows.append((label, -report[key].get("removed", 0), "out"))
    rows.append(("documents out", report["documents_out"], "in"))
    fig, (ax,) = _new((SIZE[0], 0.9 + 0.38 * len(rows)))
    left, total = [], report["documents_in"]
    for _, value, kind in rows:  # a waterfall: each removal starts where the documents left stand
        if kind == "in":
            left.append(0)
        else:
            total += value
            left.append(total)
    labels = [r[0] for r in rows]
    widths = [abs(r[1]) for r in rows]
    colors = ["#4c72b0" if r[2] == "in" else "#c44e52" for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, widths, left=left, color=colors)
    for yy, x, w, (_, value, _) in zip(y, left, widths, rows, strict=True):
        ax.text(x + w, yy, f" {value:+d}" if value < 0 else f" {value}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("documents")
    ax.set_xlim(0, report["documents_in"] * 1.12 or 1)
    ax.set_title("curation funnel")
    return Figure("curation-funnel", "curation funnel", f"{report['documents_in']} documents in, "
                  f"{report['documents_out']} out; red: removed at that step", _png(fig))


def cluster_sizes(report: dict) -> Figure | None:
    """How many near-duplicate clusters of each size fuzzy dedup found (one document of each is kept)."""
    fuzzy = report.get("fuzzy_dedup")
    if not fuzzy:
        return None
    sizes = {int(k): v for k, v in fuzzy.get("cluster_sizes", {}).items()}
    fig, (ax,) = _new()
    if sizes:
        ax.bar(list(sizes), list(sizes.values()), color="#8172b2", width=0.6)
        ax.set_xticks(sorted(sizes))
        ax.set_xlim(1, max(sizes) + 1)  # a lone size stays a bar, not the whole width
    else:
        ax.text(0.5, 0.5, "no near-duplicate clusters found", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("documents per cluster")
    ax.set_ylabel("clusters")
    ax.set_title("fuzzy dedup: cluster sizes")
    caption = (f"MinHash LSH at Jaccard >= {fuzzy.get('jaccard_threshold')}, {sum(sizes.values())} clusters, "
               f"{fuzzy.get('removed', 0)} documents removed")
    return Figure("cluster-sizes", "fuzzy-dedup cluster sizes", caption, _png(fig))


def tokens(found: list[Source]) -> Figure | None:
    if not found:
        return None
    fig, (ax,) = _new((SIZE[0], 0.9 + 0.5 * len(found) * (2 if any(s.trained for s in found) else 1)))
    names = [s.name for s in found]
    y = list(range(len(found)))[::-1]
    trained = any(s.trained for s in found)
    height = 0.4 if trained else 0.7
    ax.barh([v + (height / 2 if trained else 0) for v in y], [s.tokens for s in found], height=height,
            color="#4c72b0", label="tokens in the dataset")
    if trained:
        ax.barh([v - height / 2 for v in y], [s.trained or 0 for s in found], height=height, color="#dd8452",
                label="tokens trained on (blend weight x steps x batch)")
        ax.legend(fontsize=8)
    ax.set_yticks(y, [f"{n}\n(weight {s.weight:.2f})" for n, s in zip(names, found, strict=True)], fontsize=8)
    ax.set_xlabel("tokens")
    ax.set_title("tokens per source")
    return Figure("tokens-per-source", "tokens per source",
                  "; ".join(f"{s.name}: {s.tokens:,} tokens in {s.documents:,} documents ({s.prefix})" for s in found),
                  _png(fig))


def eval_scores(summary: dict) -> Figure | None:
    """Each metric in its own panel (their scales differ): this run, with its standard error, and
    the baseline's value when there is one."""
    checks = {(c["task"], c["metric"]): c for c in (summary.get("gate") or {}).get("checks", [])}
    panels = [(task, name, m) for task, figures in summary.get("metrics", {}).items() for name, m in figures.items()
              if isinstance(m.get("value"), (int, float))]
    if not panels:
        return None
    panels = panels[:6]  # more would be unreadable at this size; the table lists them all
    fig, axes = _new((max(SIZE[0], 2.6 * len(panels)), 3.4), ncols=len(panels))
    for ax, (task, name, m) in zip(axes, panels, strict=True):
        check = checks.get((task, name))
        labels, values, colors, errors = ["this run"], [m["value"]], ["#4c72b0"], [m.get("stderr") or 0]
        if check:
            labels.append("baseline")
            values.append(check["baseline"])
            colors.append("#8c8c8c")
            errors.append(0)
            colors[0] = "#c44e52" if check["regressed"] else "#55a868"
        ax.bar(labels, values, color=colors, yerr=errors, capsize=4)
        better = {True: "higher is better", False: "lower is better"}.get(m.get("higher_is_better"), "")
        ax.set_title(f"{task.removeprefix('kiln_')}\n{name}" + (f" ({better})" if better else ""), fontsize=9)
        ax.tick_params(labelsize=8)
    gate = summary.get("gate")
    caption = ("green: within tolerance of the baseline, red: regressed" if gate else
               "no baseline: run kiln eval with --baseline, or kiln report --baseline, to compare")
    return Figure("eval-scores", "eval scores against the baseline" if gate else "eval scores", caption, _png(fig))
