"""Metrics out of lm-eval's results, the table people read, and the regression gate for CI."""

from __future__ import annotations

import math

from kiln.errors import RegressionError

RATIOS = {"bits_per_byte": lambda r: r / math.log(2), "byte_perplexity": math.exp, "word_perplexity": math.exp}


def ratio_stderr(items: list, transform) -> float | None:
    """Standard error of a corpus-level ratio metric (bits per byte, perplexities: total negative
    log-likelihood over total bytes or words) by the delta method over documents; lm-eval reports
    none for these, and kiln's gate needs to know how much a figure moves by chance."""
    n = len(items)
    if n < 2:
        return None
    nll, size = [-float(ll) for ll, _ in items], [float(b) for _, b in items]
    ratio, mean_size = sum(nll) / sum(size), sum(size) / n
    residual = [x - ratio * y for x, y in zip(nll, size, strict=True)]
    se = math.sqrt(sum(r * r for r in residual) / (n - 1) / n) / mean_size  # of the ratio itself
    return abs(transform(ratio + se) - transform(ratio - se)) / 2  # through the metric's transform


def metrics(results: dict) -> dict:
    """task -> metric -> {value, stderr, higher_is_better}; lm-eval keys read "<metric>,<filter>".
    The ratio metrics' standard errors come from the per-document samples (`ratio_stderr`)."""
    out: dict = {}
    for task, row in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            stderr = row.get(f"{metric}_stderr,{filt}")
            if not isinstance(stderr, (int, float)) and metric in RATIOS:
                items = [sample[metric] for sample in results.get("samples", {}).get(task, []) if metric in sample]
                stderr = ratio_stderr(items, RATIOS[metric])
            out.setdefault(task, {})[name] = {
                "value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None,
                "higher_is_better": better.get(metric)}
    return out


def compare(summary: dict, baseline: dict, tolerance: float, source: str) -> dict:
    """Every metric of the baseline, checked: worse than it by more than `tolerance` is a regression;
    a metric the baseline has and this run lacks is one too."""
    checks, regressions = [], []
    for task, figures in baseline.get("metrics", {}).items():
        for name, base in figures.items():
            now = summary["metrics"].get(task, {}).get(name)
            if now is None:
                regressions.append(f"{task} {name}: in the baseline, missing now")
                continue
            up = base.get("higher_is_better")
            worse = (base["value"] - now["value"]) if up in (True, None) else (now["value"] - base["value"])
            check = {"task": task, "metric": name, "baseline": base["value"], "value": now["value"],
                     "worse_by": worse, "regressed": not math.isfinite(now["value"]) or worse > tolerance}
            checks.append(check)
            if check["regressed"]:
                regressions.append(f"{task} {name}: {now['value']:.6g} vs baseline {base['value']:.6g} "
                                   f"({'lower' if up in (True, None) else 'higher'} is worse; tolerance {tolerance:g})")
    return {"baseline": source, "tolerance": tolerance, "checks": checks, "regressions": regressions,
            "passed": not regressions}


def enforce(summary: dict) -> None:
    gate = summary.get("gate")
    if gate and not gate["passed"]:
        raise RegressionError(f"evaluation regressed against {gate['baseline']}: " + "; ".join(gate["regressions"]))


def table(summary: dict) -> str:
    rows = [("task", "metric", "value", "± stderr")]
    for task, figures in summary["metrics"].items():
        for name, m in figures.items():
            err = f"{m['stderr']:.4f}" if m["stderr"] is not None else "-"
            rows.append((task, name, f"{m['value']:.4f}", err))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    gate = summary.get("gate")
    if gate:
        lines.append(f"gate vs {gate['baseline']}: " + ("passed" if gate["passed"] else
                                                        "REGRESSED: " + "; ".join(gate["regressions"])))
    return "\n".join(lines)
