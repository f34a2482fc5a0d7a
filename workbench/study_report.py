"""A study's table, report and plots: `runs.csv`, `results.csv` (over seeds), `report.md`, PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.io import atomic_write_text, read_jsonl
from workbench.study import PlotSpec, RunSpec, StudyConfig, aggregate, collect_run, run_status
from workbench.study_analysis import agreement_markdown, compare


def write_results(study: StudyConfig, runs: list[RunSpec]) -> tuple[Path, Path]:
    """`<study>/runs.csv` (one row per run), `<study>/results.csv` (over seeds) and `<study>/report.md`."""
    import csv
    import io
    import json

    rows = [collect_run(run, study.collect) for run in runs]
    agreements = compare(study, rows)
    fixed = {"run", "seed", "status", *study.axes}
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if k not in fixed and isinstance(v, (int, float))))
    table = aggregate(rows, list(study.axes), keys)
    folder = Path(study.runs_dir) / study.study

    def to_csv(records: list[dict[str, Any]]) -> str:
        columns = list(dict.fromkeys(k for r in records for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()

    atomic_write_text(folder / "runs.csv", to_csv(rows))
    atomic_write_text(folder / "results.csv", to_csv(table))
    atomic_write_text(folder / "analysis.json", json.dumps(agreements, indent=1, default=str))
    failed = [r for r in rows if r["status"] == "failed"]
    label = f" (profile **{study.profile}**: a reduced or enlarged grid, not the default one)" if study.profile else ""
    lines = [f"# Study {study.study}{label}", "", study.description, "",
             f"{len(runs)} runs ({len(failed)} failed); base `{study.base}`; seeds {study.seeds}.", "",
             "Mean ± standard deviation over seeds (n = number of seeds with a value). `best_<key>` is the best value "
             "of a run's curve and `best_step_<key>` its step; `delta_<key>` a paired difference to the reference "
             "run of the same seed.", ""]
    shown = [k for k in keys if any(f"{k}_mean" in t for t in table)]
    lines.append("| " + " | ".join([*study.axes, *shown]) + " |")
    lines.append("|" + "---|" * (len(study.axes) + len(shown)))
    for entry in table:
        cells = [str(entry[a]) for a in study.axes]
        cells += [f"{entry[f'{k}_mean']:.4g} ± {entry[f'{k}_std']:.2g} (n={entry[f'{k}_n']})"
                  if f"{k}_mean" in entry else "–" for k in shown]
        lines.append("| " + " | ".join(cells) + " |")
    for result in agreements:
        lines += ["", *agreement_markdown(result)]
    for row in failed:
        lines.append(f"\n- failed: `{row['run']}`: {run_status(next(r for r in runs if r.name == row['run']))}")
    for plot in study.plots:
        path = draw(plot, study, runs, table)
        lines.append(f"\n![{path.stem}]({path.name})")
    report = folder / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return folder / "results.csv", report


def draw(plot: PlotSpec, study: StudyConfig, runs: list[RunSpec], table: list[dict[str, Any]]) -> Path:
    """Draw one PlotSpec to `<study>/<name>.png` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def selected(values: dict[str, Any]) -> bool:
        return all(str(values.get(axis)) == str(value) for axis, value in plot.where.items())

    table = [t for t in table if selected(t)]
    runs = [r for r in runs if selected(r.values)]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if plot.kind == "final":
        groups = list(dict.fromkeys(str(t.get(plot.group)) for t in table)) if plot.group else [None]  # axis order
        for group in groups:
            points = sorted((_number(t[plot.x]), t[f"{plot.y}_mean"], t[f"{plot.y}_std"]) for t in table
                             if f"{plot.y}_mean" in t and (group is None or str(t.get(plot.group)) == group))
            if points:
                x, mean, std = zip(*points, strict=True)
                ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"{plot.group}={group}" if group else None)
        ax.set_xlabel(plot.x)
    else:
        curves: dict[str, list[list[tuple[int, float]]]] = {}
        for run in runs:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in run.values.items()) or run.name
            path = run.run_dir / "metrics.jsonl"
            points = [(r["step"], r[plot.y]) for r in (read_jsonl(path) if path.is_file() else [])
                      if isinstance(r.get(plot.y), (int, float))]
            if points:
                curves.setdefault(label, []).append(points)
        for label, seeds in curves.items():
            length = min(len(s) for s in seeds)
            steps = [p[0] for p in seeds[0][:length]]
            ax.plot(steps, np.mean([[p[1] for p in s[:length]] for s in seeds], axis=0), label=label)
        ax.set_xlabel("step")
    if plot.logx:
        ax.set_xscale("log")
    ax.set_ylabel(plot.y)
    where = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in plot.where.items())
    ax.set_title(f"{study.study}: {plot.y}" + (f" ({where})" if where else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(study.runs_dir) / study.study / f"{plot.name or f'{plot.y}_vs_{plot.x}'}.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
