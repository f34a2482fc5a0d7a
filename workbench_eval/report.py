"""`report.md` and PNG plots from `results.jsonl`: scores per checkpoint and Kendall-tau stability, with
warnings where there are too few checkpoints or items for tau to mean anything."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from workbench.io import atomic_write_text
from workbench.stats import kendall_tau_b
from workbench_eval.results import metric_info, split_experts_style
from workbench_eval.stability import EARLY_MIN, NOTE_CONSTANT, NOTE_TOO_FEW, StabilityResult, stability
from workbench_eval.styles import style_colour

# Below these, Kendall's tau says little (docs/evaluation.md, "Metrics"): with 4 checkpoints even a perfect
# ordering has p = 0.083 (exact, two-sided), with 5 it is 0.017; with n items an accuracy's standard error
# is up to 0.5/sqrt(n), 0.05 at n = 100, as large as a typical change between checkpoints.
MIN_CHECKPOINTS = 5
MIN_ITEMS = 100
MAX_TICK_LABELS = 8  # checkpoint steps labelled on a plot's x axis; every checkpoint gets a tick


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def latest_by_cell(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """(task, style, metric, checkpoint) -> the record with the most items (the newest among equals)."""
    cells: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        key = (r["task"], r["style"], r["metric"], r["checkpoint"])
        if key not in cells or r["n"] >= cells[key]["n"]:
            cells[key] = r
    return cells


def series(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(task, style, metric) -> records sorted by step (checkpoints without a step are left out)."""
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for (task, style, metric, _), r in latest_by_cell(records).items():
        if r.get("step") is not None:
            grouped[(task, style, metric)].append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in sorted(grouped.items())}


def stability_of(points: list[dict[str, Any]], n_boot: int, early_fraction: float) -> StabilityResult | None:
    """Stability of one (task, style, metric) series, in the metric's direction; None below 2 checkpoints."""
    if len(points) < 2:
        return None
    steps = [p["step"] for p in points]
    lengths = {len(p["items"]) for p in points}
    items = np.array([p["items"] for p in points], dtype=float) if len(lengths) == 1 and 0 not in lengths else None
    return stability(steps, [p["value"] for p in points], item_scores=items, early_fraction=early_fraction,
                     n_boot=n_boot if items is not None else 0,
                     higher_is_better=metric_info(points[0]["metric"]).higher_is_better)


def write_report(results: list[dict[str, Any]], out_dir: Path, title: str, n_boot: int = 1000,
                 early_fraction: float = 0.3) -> Path:
    """Write report.md and one PNG per task into `out_dir`; return the report's path."""
    by_series = series(results)
    lines = [f"# Evaluation of {title}", ""]
    skipped = {r["checkpoint"]: r["reason"] for r in results if r.get("status") == "skipped"}
    evaluated = {r["checkpoint"] for r in results if r.get("status", "ok") == "ok"}
    skipped = {c: why for c, why in skipped.items() if c not in evaluated}
    lines += small_sample_warnings(by_series)
    lines += _score_table(by_series)
    lines += _experts_table(by_series)
    lines += _stability_table(by_series, n_boot, early_fraction)
    if skipped:
        lines += ["## Skipped checkpoints", ""] + [f"- `{c}`: {why}" for c, why in sorted(skipped.items())] + [""]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_scores(by_series, out_dir)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def small_sample_warnings(by_series) -> list[str]:
    """Visible warning lines when the run has fewer than MIN_CHECKPOINTS checkpoints or a task fewer than
    MIN_ITEMS items per checkpoint."""
    lines: list[str] = []
    checkpoints = max((len(points) for points in by_series.values()), default=0)
    if checkpoints == 1:
        lines += ["> **Warning: only 1 checkpoint.** Kendall's tau of score against step needs at least 2 (and "
                  f"at least {MIN_CHECKPOINTS} to mean anything): no stability is computed.", ""]
    elif 1 < checkpoints < MIN_CHECKPOINTS:
        best_p = kendall_tau_b(range(checkpoints), range(checkpoints))[1]
        lines += [
            f"> **Warning: only {checkpoints} checkpoints.** Kendall's tau needs at least {MIN_CHECKPOINTS} to "
            f"mean anything: with {checkpoints} even a perfect ordering has p = {_fmt(best_p)}, so no tau below "
            "can be told apart from chance.", ""]
    few: dict[str, int] = {}
    for (task, _, metric), points in by_series.items():
        n = min(p["n"] for p in points)
        if n < MIN_ITEMS and metric_info(metric).share:
            few[task] = min(n, few.get(task, n))
    for task, n in sorted(few.items()):
        lines += [
            f"> **Warning: {task} has only {n} item{'s' * (n != 1)} per checkpoint** (fewer than {MIN_ITEMS}): "
            f"a score's standard error is up to 0.5/√n = {0.5 / math.sqrt(max(n, 1)):.2f}, so smaller changes "
            "between checkpoints are noise and tau mostly ranks noise.", ""]
    return lines


def _score_table(by_series) -> list[str]:
    columns = list(by_series)
    steps = sorted({p["step"] for pts in by_series.values() for p in pts})
    value = {(key, p["step"]): p["value"] for key, pts in by_series.items() for p in pts}
    lines = ["## Scores per checkpoint", "", "| step | " + " | ".join(f"{t} {s} {m}" for t, s, m in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(_fmt(value.get((c, step))) for c in columns) + " |")
    return lines + [""]


def _experts_table(by_series) -> list[str]:
    """A self-slimmable SMoE evaluation (styles `<style>@k<K>`, `launch/eval.py --experts`): each task, style
    and metric against the number of active experts k, at the last checkpoint evaluated; [] if there is none."""
    curves: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for (task, style, metric), points in by_series.items():
        base, k = split_experts_style(style)
        if k is not None:
            curves[(task, base, metric)][k] = points[-1]
    if not curves:
        return []
    columns = sorted(curves)
    counts = sorted({k for curve in curves.values() for k in curve})
    steps = sorted({p["step"] for curve in curves.values() for p in curve.values()})
    at = f"step {steps[-1]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"
    lines = [f"## Scores per number of active experts k (SMoE, the last checkpoint evaluated: {at})", "",
             "| k | " + " | ".join(f"{t} {s} {m}" for t, s, m in columns) + " |", "|---:|" + "---:|" * len(columns)]
    for k in counts:
        lines.append(f"| {k} | " + " | ".join(_fmt(curves[c][k]["value"]) if k in curves[c] else "–"
                                             for c in columns) + " |")
    return lines + [""]


def _tau_cell(value: float, note: str) -> str:
    """A tau, or `– (why)` where it is undefined."""
    return f"– ({note})" if note else _fmt(value)


def _stability_table(by_series, n_boot: int, early_fraction: float) -> list[str]:
    lines = ["## Stability: Kendall's tau-b of score against training step", "",
             f"Early window: the first {early_fraction:.0%} of the checkpoints. Interval: {n_boot} bootstrap "
             "resamples of the items, 95%. Better: the metric's direction; for a lower-is-better metric a steady "
             "improvement shows as tau near -1. Improving: share of adjacent checkpoint pairs whose score gets "
             "better (rises, or falls where lower is better). Successive variance: mean squared step-to-step "
             "change / 2.", "",
             "| task | style | metric | better | tau | p | tau early | 95% interval | improving | successive var "
             "| var |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    notes: dict[tuple[str, str], set[tuple[int, int]]] = {}  # (column, note) -> {(checkpoints, early ones)}
    no_interval = False
    for (task, style, metric), points in by_series.items():
        s = stability_of(points, n_boot, early_fraction)
        if s is None:
            continue
        for column, note in (("tau", s.tau_note), ("early", s.tau_early_note)):
            if note:
                notes.setdefault((column, note), set()).add((s.n_checkpoints, s.n_early))
        no_interval |= not s.n_boot_used
        lines.append(
            f"| {task} | {style} | {metric} | {'higher' if s.higher_is_better else 'lower'} | "
            f"{_tau_cell(s.tau, s.tau_note)} | {_fmt(s.p_value)} | {_tau_cell(s.tau_early, s.tau_early_note)} | "
            f"[{_fmt(s.ci_low)}, {_fmt(s.ci_high)}] | {_fmt(s.frac_improving, 2)} | "
            f"{_fmt(s.successive_variance, 5)} | {_fmt(s.total_variance, 5)} |"
        )
    return lines + [""] + _stability_legend(notes, no_interval, early_fraction)


def _stability_legend(notes: dict[tuple[str, str], set[tuple[int, int]]], no_interval: bool,
                      early_fraction: float) -> list[str]:
    """Why the stability table shows `–` where it does (only the reasons that occur)."""
    legend = []
    if any(note == NOTE_CONSTANT for _, note in notes):
        legend.append(f"- – ({NOTE_CONSTANT}): the score is the same at every checkpoint (in tau early: of the "
                      "early window), so Kendall's tau-b is 0/0, undefined: there is no ordering to measure. "
                      "Its p is – too.")
    if ("early", NOTE_TOO_FEW) in notes:
        counts = notes[("early", NOTE_TOO_FEW)]
        (t, early), *others = sorted(counts)
        held = " of the checkpoints" if others else f" of the {t} checkpoints: {early}"
        legend.append(f"- – ({NOTE_TOO_FEW}) in tau early: the early window (the first {early_fraction:.0%}{held}) "
                      f"has fewer than the {EARLY_MIN} checkpoints tau early needs.")
    if no_interval:
        legend.append("- [–, –]: no bootstrap interval: bootstrap is off, the checkpoints were scored on different "
                      "numbers of items, or every resample was constant.")
    return legend + [""] if legend else []


def plot_scores(by_series, out_dir: Path) -> list[Path]:
    """One PNG per task (`<task>.png`): its primary metric against step, one line per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _, m in by_series if metric_info(m).primary})
    paths = []
    for task in tasks:
        fig = task_figure(task, {k: v for k, v in by_series.items() if k[0] == task and metric_info(k[2]).primary})
        path = out_dir / f"{task}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def task_figure(task: str, lines: dict[tuple[str, str, str], list[dict[str, Any]]]):
    """A task's score against training step, one line per (style, metric): every checkpoint a tick, steps
    labelled, a dashed chance line for multiple-choice accuracy, the item count n in the title."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2))
    metrics = sorted({m for _, _, m in lines})
    for (_, style, metric), points in lines.items():
        ax.plot([p["step"] for p in points], [p["value"] for p in points], marker="o", color=style_colour(style),
                linestyle="-" if metric == metrics[0] else ":",
                label=style if len(metrics) == 1 else f"{style} ({metric})")
    points = [p for pts in lines.values() for p in pts]
    step_axis(ax, sorted({p["step"] for p in points}))
    chances = [p["chance"] for p in points if p.get("chance") is not None]
    top = max([p["value"] for p in points] + chances)
    if chances:
        chance = sum(chances) / len(chances)
        ax.axhline(chance, linestyle="--", color="0.35", linewidth=1.2, label=_chance_label(chance), zorder=1)
    info = metric_info(metrics[0])  # one primary metric per task kind: acc, f1 or exact_match
    ax.set_ylabel(info.label if len(metrics) == 1 else "score")
    if info.share:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        top = min(1.0, max(0.05, top * 1.15))
        ax.set_ylim(-0.03 * top, top * 1.03)
    ns = sorted({p["n"] for p in points})
    items = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
    ax.set_title(f"{task}: {info.label.split(' (')[0] if len(metrics) == 1 else 'score'} by training step\n"
                 f"({items} items per checkpoint)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="prompt style", title_fontsize=8)
    fig.tight_layout()
    return fig


def _chance_label(chance: float) -> str:
    options = 1 / chance
    if abs(options - round(options)) < 1e-6:
        return f"chance (1 of {round(options)} options): {chance:.0%}"
    return f"chance (random option): {chance:.1%}"


def step_axis(ax, steps: list[int]) -> None:
    """Checkpoint steps on the x axis: a tick at every checkpoint, at most MAX_TICK_LABELS labelled; a log
    scale when the checkpoints crowd the start of a long run (log-spaced saving), else linear."""
    from matplotlib.ticker import NullFormatter

    positive = [s for s in steps if s > 0]
    log = bool(positive) and max(steps) >= 20 * min(positive) and float(np.median(steps)) < 0.2 * max(steps)
    if log:
        if min(steps) > 0:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=min(positive), linscale=0.5)
    stride = max(1, math.ceil((len(steps) - 1) / (MAX_TICK_LABELS - 1)))
    labelled = sorted({*steps[::stride], steps[-1]})  # every stride-th checkpoint, and the last
    ax.set_xticks(steps, minor=True)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(labelled, [f"{s:,}" for s in labelled])
    ax.set_xlabel("training step of the checkpoint" + (" (log scale)" if log else ""))
