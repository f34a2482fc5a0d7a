"""`eval/report.md` and PNG plots from `eval/results.jsonl`: scores per checkpoint and Kendall-tau stability."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from evals.stability import StabilityResult, stability
from workbench.io import atomic_write_text

PRIMARY = {"acc", "f1"}  # the metric each plot shows


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
    if len(points) < 2:
        return None
    steps = [p["step"] for p in points]
    lengths = {len(p["items"]) for p in points}
    items = np.array([p["items"] for p in points], dtype=float) if len(lengths) == 1 and 0 not in lengths else None
    return stability(steps, [p["value"] for p in points], item_scores=items, early_fraction=early_fraction,
                     n_boot=n_boot if items is not None else 0)


def write_report(results: list[dict[str, Any]], out_dir: Path, title: str, n_boot: int = 1000,
                 early_fraction: float = 0.3) -> Path:
    """Write report.md and one PNG per task into `out_dir`; return the report's path."""
    by_series = series(results)
    lines = [f"# Evaluation of {title}", ""]
    skipped = {r["checkpoint"]: r["reason"] for r in results if r.get("status") == "skipped"}
    evaluated = {r["checkpoint"] for r in results if r.get("status", "ok") == "ok"}
    skipped = {c: why for c, why in skipped.items() if c not in evaluated}
    lines += _score_table(by_series)
    lines += _stability_table(by_series, n_boot, early_fraction)
    if skipped:
        lines += ["## Skipped checkpoints", ""] + [f"- `{c}`: {why}" for c, why in sorted(skipped.items())] + [""]
    plots = plot_scores(by_series, out_dir)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _score_table(by_series) -> list[str]:
    columns = list(by_series)
    steps = sorted({p["step"] for pts in by_series.values() for p in pts})
    value = {(key, p["step"]): p["value"] for key, pts in by_series.items() for p in pts}
    lines = ["## Scores per checkpoint", "", "| step | " + " | ".join(f"{t} {s} {m}" for t, s, m in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(_fmt(value.get((c, step))) for c in columns) + " |")
    return lines + [""]


def _stability_table(by_series, n_boot: int, early_fraction: float) -> list[str]:
    lines = ["## Stability: Kendall's tau-b of score against training step", "",
             f"Early window: the first {early_fraction:.0%} of the checkpoints. Interval: "
             f"{n_boot} bootstrap resamples of the items, 95%. Improving: share of adjacent checkpoint pairs "
             "whose score rises. Successive variance: mean squared step-to-step change / 2.", "",
             "| task | style | metric | tau | p | tau early | 95% interval | improving | successive var | var |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for (task, style, metric), points in by_series.items():
        s = stability_of(points, n_boot, early_fraction)
        if s is None:
            continue
        lines.append(
            f"| {task} | {style} | {metric} | {_fmt(s.tau)} | {_fmt(s.p_value)} | {_fmt(s.tau_early)} | "
            f"[{_fmt(s.ci_low)}, {_fmt(s.ci_high)}] | {_fmt(s.frac_improving, 2)} | "
            f"{_fmt(s.successive_variance, 5)} | {_fmt(s.total_variance, 5)} |"
        )
    return lines + [""]


def plot_scores(by_series, out_dir: Path) -> list[Path]:
    """One PNG per task: the primary metric against step, one line per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _, m in by_series if m in PRIMARY})
    paths = []
    for task in tasks:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for (t, style, metric), points in by_series.items():
            if t == task and metric in PRIMARY:
                ax.plot([p["step"] for p in points], [p["value"] for p in points], marker="o", label=f"{style} ({metric})")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("score")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths
