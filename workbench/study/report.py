"""A study's table, report and plots: `runs.csv`, `results.csv` (over seeds), `analysis.json`, `report.md`,
PNGs; for a study's runs or for runs launched by hand (`workbench.study.collect.hand_study`)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import ConfigError
from workbench.io import atomic_write_bytes, atomic_write_text, read_jsonl
from workbench.layout import EXPERTS_MARK, METRICS, results_path
from workbench.study.analysis import agreement_markdown, compare
from workbench.study.claims import claims_markdown, evaluate_claims
from workbench.study.collect import aggregate, collect_run, epochs_per_step, evaluator_series
from workbench.study.plan import (
    DeltaSpec,
    PlotSpec,
    RunSpec,
    StudyConfig,
    axis_values,
    collected,
    pretrain_runs,
    warn,
)
from workbench.study.runner import run_status

CLAIMS = "claims.json"  # a study's claims with their tests and verdicts (`workbench.study.claims`)


def write_results(study: StudyConfig, runs: list[RunSpec], folder: str | Path | None = None,
                  on_warning: Callable[[str], None] = warn) -> tuple[Path, Path]:
    """`runs.csv` (one row per run), `results.csv` (over seeds), `analysis.json`, `report.md` and the plots,
    in `folder` (default `<runs_dir>/<study>`); returns the paths of results.csv and report.md. Once a run is
    done, a collected key or a delta that no run has is passed to `on_warning` and named in report.md."""
    folder = Path(folder) if folder is not None else study.folder
    rows = [collect_run(run, study.collect, study.select, study.spread_from, study.noise) for run in runs]
    agreements = compare(study, rows)
    claims = evaluate_claims(study.claims, rows, {a: axis_values(study, a) for a in study.axes})
    # with no run done yet (all pending, failed or not started), nothing is expected to be there
    absent = missing_columns(study, rows) if any(r["status"] == "done" for r in rows) else {}
    for column, why in absent.items():
        on_warning(f"{folder}: '{column}' is in no run's results ({why}); it is not in the table")
    fixed = {"run", "seed", "status", *study.axes}
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if k not in fixed and isinstance(v, (int, float))))
    table = aggregate(rows, list(study.axes), keys)
    atomic_write_text(folder / "runs.csv", _csv(rows))
    atomic_write_text(folder / "results.csv", _csv(table))
    atomic_write_text(folder / "analysis.json", json.dumps(agreements, indent=1, default=str))
    if study.claims:
        atomic_write_text(folder / CLAIMS, json.dumps(claims, indent=1, default=str) + "\n")
    failed = [r for r in rows if r["status"] == "failed"]
    statuses = [r["status"] for r in rows]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    label = f" (profile **{study.profile}**: a reduced or enlarged grid, not the default one)" if study.profile else ""
    by_hand = bool(runs) and runs[0].stage == "hand"
    source = (f"runs {', '.join(f'`{r.name}`' for r in runs)}" if by_hand
              else f"base `{study.base}`; seeds {study.seeds}")
    choice = (f"the {'highest' if study.select.best == 'max' else 'lowest'} `{study.select.by}`" if study.select
              else "the lowest validation loss")
    lines = [f"# {'Runs' if by_hand else 'Study'} {study.study}{label}", "", study.description, "",
             f"{len(runs)} runs ({counts or 'none'}); {source}.", "",
             *_pretrain_lines(study),
             "Mean ± standard deviation over seeds (n = number of seeds with a value). `best_<key>` is the best value "
             "of a run's curve and `best_step_<key>` its step; `best@<task.style.metric>` the evaluator's score at "
             f"the checkpoint with {choice} (`best_eval_step`); `var@<key>` the variance of a key's "
             "values over the run's checkpoints and `osc@<key>` half their mean squared change from one checkpoint "
             "to the next (oscillation without the trend); `delta_<key>` a paired difference "
             "to the reference run of the same seed, with its 95% Student-t interval over seeds in brackets, marked "
             "*inside the seed spread* where that interval holds 0 (exploratory, unless a claim names it)"
             + ("; `test@` the test set scored at that checkpoint only, `base@` the model the run started from on "
                "the same test items" if study.select else "") + ".", "", *claims_markdown(claims),
             *([""] if claims else [])]
    shown = [k for k in keys if any(f"{k}_mean" in t for t in table)]
    if study.primary:
        lines += _primary_lines(study, table, shown)
    lines.append("| " + " | ".join([*study.axes, *shown]) + " |")
    lines.append("|" + "---|" * (len(study.axes) + len(shown)))
    for entry in table:
        cells = [str(entry[a]) for a in study.axes]
        cells += [_cell(entry, k) for k in shown]
        lines.append("| " + " | ".join(cells) + " |")
    if absent:
        lines += ["", "In no run's results (so not in the table): "
                  + "; ".join(f"`{column}` ({why})" for column, why in absent.items()) + "."]
    for result in agreements:
        lines += ["", *agreement_markdown(result)]
    for row in failed:
        lines.append(f"\n- failed: `{row['run']}`: {run_status(next(r for r in runs if r.name == row['run']))}")
    for plot in (p for p in study.plots if p.y not in absent):  # a missing column was named above
        path = draw(plot, study, runs, table, folder)
        lines.append(f"\n![{path.stem}]({path.name})")
    report = folder / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    if study.publish and study.profile is None and rows and all(r["status"] == "done" for r in rows):
        publish(folder, Path(study.publish))
        if study.page:
            try:
                write_page_block(Path(study.page), study.study, claims_markdown(claims), Path(study.publish))
            except ConfigError as err:
                on_warning(str(err))
    return folder / "results.csv", report


def publish(folder: Path, target: Path) -> None:
    """Copy a finished study's report.md, claims.json, results.csv and plots into `target` (its `publish`
    folder, e.g. under docs/), replacing what an earlier run put there."""
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.png"):
        old.unlink()
    for path in folder.iterdir():
        if path.suffix == ".png" or path.name in ("report.md", CLAIMS, "results.csv"):
            atomic_write_bytes(target / path.name, path.read_bytes())


def write_page_block(page: Path, name: str, lines: list[str], published: Path) -> None:
    """Replace the block between `<!-- study NAME -->` and `<!-- /study NAME -->` of `page` (a method page) with
    the claims table and a link to the full report in `published`; a page without the markers is a ConfigError."""
    begin, end = f"<!-- study {name} -->", f"<!-- /study {name} -->"
    text = page.read_text() if page.is_file() else ""
    if begin not in text or end not in text:
        raise ConfigError(f"field 'page': '{page}' has no block '{begin}' ... '{end}' for the study's claims")
    report = Path(os.path.relpath(published / "report.md", page.parent)).as_posix()
    body = [line.replace("## Claims", "#### Claims (generated by the study)") for line in lines]
    block = "\n".join([begin, *body, "", f"The study's whole report, with every table and plot: [{report}]({report}).",
                       end])
    head, rest = text.split(begin, 1)
    atomic_write_text(page, head + block + rest.split(end, 1)[1])


def claim_checks(study: StudyConfig) -> list[str]:
    """The failed checks of the study's claims in its last report (e.g. a learning-rate grid that does not
    bracket an arm's best rate): empty when all passed or the study has no claims."""
    path = study.folder / CLAIMS
    return [check for claim in json.loads(path.read_text()) for check in claim["checks"]] if path.is_file() else []


def _primary_lines(study: StudyConfig, table: list[dict[str, Any]], shown: list[str]) -> list[str]:
    """The primary metric at a glance: final and best value, and every paired difference of either."""
    primary = study.primary
    wanted = [primary, f"best_{primary}"] + [k for k in shown if k.startswith("delta") and
                                             (k.endswith(f"_{primary}") and k != primary)]
    columns = [k for k in dict.fromkeys(wanted) if k in shown]
    lines = [f"**Primary metric: `{primary}`** (final value, best over training, and their paired differences).", "",
             "| " + " | ".join([*study.axes, *columns]) + " |", "|" + "---|" * (len(study.axes) + len(columns))]
    lines += ["| " + " | ".join([str(t[a]) for a in study.axes] + [_cell(t, k) for k in columns]) + " |" for t in table]
    return [*lines, "", "All collected columns:", ""]


def _cell(entry: dict[str, Any], key: str) -> str:
    """'mean ± std (n=k)'; for a paired delta also its 95% interval, and whether it holds 0."""
    if f"{key}_mean" not in entry:
        return "–"
    mean, text = entry[f"{key}_mean"], f"{entry[f'{key}_mean']:.4g} ± {entry[f'{key}_std']:.2g} (n={entry[f'{key}_n']})"
    half = entry.get(f"{key}_ci95")
    if half is None or not math.isfinite(half):
        return text
    inside = " *inside the seed spread*" if mean - half <= 0 <= mean + half and (mean != 0 or half > 0) else ""
    return f"{text} [{mean - half:.3g}, {mean + half:.3g}]{inside}"


def missing_columns(study: StudyConfig, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each collected key, and each delta and agreement `y` of `compare`, that no row has -> why it matters."""
    present = {key for row in rows for key in row}
    wanted = {key: "collected" for key in collected(study.collect)}
    for spec in study.compare:
        if isinstance(spec, DeltaSpec):
            wanted.update({spec.column(key): f"compare: delta against {spec.axis} = {spec.reference}" for key in spec.keys})
        else:
            wanted.setdefault(spec.y, f"compare: agreement across {spec.group}")
    return {key: why for key, why in wanted.items() if key not in present}


def _pretrain_lines(study: StudyConfig) -> list[str]:
    """The report's section on the pretrain run(s) the arms start from (none for a one-stage study)."""
    runs = pretrain_runs(study)
    if not runs:
        return []
    per = study.pretrain.per
    several = len(runs) > 1 or per is not None or study.pretrain.seeded
    lines = ["## Pretrain runs" if several else "## Pretrain run", ""]
    if several:
        own = " and ".join(([f"`{per}` value"] if per else []) + (["seed"] if study.pretrain.seeded else []))
        lines += [f"Each arm starts from the pretrain run of its {own} (`{study.pretrain.as_key}` of each "
                  "arm); no arm starts while one of them failed.", ""]
    for run in runs:
        status = run_status(run)
        overrides = ", ".join(f"`{o}`" for o in run.overrides() if not o.startswith(("name=", "runs_dir="))) or "none"
        where = f"config `{run.config}`, overrides {overrides}"
        line = (f"- `{run.name}`: `{run.run_dir}` ({where}): **{status['status']}**." if several else
                f"Every arm starts from the pretrain run `{run.run_dir}` ({where}; `{study.pretrain.as_key}` of "
                f"each arm): **{status['status']}**.")
        if status["status"] == "failed":
            line += f" The pretrain run failed ({status.get('error')}); **the arms were not started**."
        elif status["status"] == "done":
            row = collect_run(run, study.collect, study.select, study.spread_from, study.noise)
            values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k in collected(study.collect))
            line += f" Its final values: {values or '(none of the collected keys)'}."
        lines.append(line)
    return [*lines, ""]


def _csv(records: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def draw(plot: PlotSpec, study: StudyConfig, runs: list[RunSpec], table: list[dict[str, Any]],
         folder: Path) -> Path:
    """Draw one PlotSpec to `<folder>/<name>.png` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def selected(values: dict[str, Any]) -> bool:
        return all(str(values.get(axis)) == str(value) for axis, value in plot.where.items())

    table = [t for t in table if selected(t)]
    runs = [r for r in runs if selected(r.values)]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ""
    x_values: set[float] = set()  # a `final` plot's numeric x values: few of them get a labelled tick each
    if plot.kind == "final":
        groups = list(dict.fromkeys(str(t.get(plot.group)) for t in table)) if plot.group else [None]  # axis order
        paired = plot.y.startswith("delta_")  # a paired difference: its 95% interval, against a zero line
        spread = f"{plot.y}_ci95" if paired else f"{plot.y}_std"
        bars = "bars: 95% t-interval over seeds" if paired else "bars: ± 1 std over seeds"
        x_key = plot.x if plot.x in study.axes else f"{plot.x}_mean"  # an axis, or a run column (mean over seeds)
        for group in groups:
            points = [(_number(t[x_key]), t[f"{plot.y}_mean"], t.get(spread, 0.0)) for t in table
                      if f"{plot.y}_mean" in t and x_key in t and (group is None or str(t.get(plot.group)) == group)]
            categorical = any(isinstance(p[0], str) for p in points)
            # numbers in order; categories sorted by their value when alone, else in the axis's order (aligned groups)
            points = sorted(points, key=lambda p: p[1]) if categorical and len(groups) == 1 else (
                points if categorical else sorted(points))
            if points:
                x, mean, err = zip(*points, strict=True)
                x_values |= set() if categorical else set(x)
                err = [e if isinstance(e, float) and math.isfinite(e) else 0.0 for e in err]
                ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, linestyle="none" if categorical else "-",
                            label=f"{plot.group}={group}" if group else None)
        if paired:
            ax.axhline(0.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xlabel(plot.x)
        named = any(isinstance(_number(t.get(plot.x)), str) for t in table)
        if named and len(table) > 5:  # many categories: slanted, anchored at their tick, so names do not overlap
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    elif plot.kind == "experts":
        bars = _draw_experts(ax, plot, study, table)
    else:
        curves: dict[str, list[list[tuple[float, float]]]] = {}
        references: dict[str, list[float]] = {}
        for run in runs:
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in run.values.items()
                              if k not in plot.where) or "all runs"  # `where` fixes its axes: the title says them
            points = curve_points(run.run_dir, plot.y, plot.x)
            if points and plot.reference and all(str(run.values.get(a)) == str(v) for a, v in plot.reference.items()):
                references.setdefault(label, []).append(points[-1][1])
            elif points:
                curves.setdefault(label, []).append(points)
        for label, finals in references.items():
            mean = float(np.mean(finals))
            line = ax.axhline(mean, color="0.25", linestyle="--", linewidth=1.2, label=f"{label} (final value)")
            if len(finals) > 1:
                std = float(np.std(finals, ddof=1))
                ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.12, linewidth=0)
        banded = False
        for label, seeds in curves.items():
            length = min(len(s) for s in seeds)
            steps = [p[0] for p in seeds[0][:length]]
            values = np.array([[p[1] for p in s[:length]] for s in seeds], dtype=float)
            (line,) = ax.plot(steps, values.mean(axis=0), label=label)
            if len(seeds) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(steps, values.mean(axis=0) - std, values.mean(axis=0) + std, alpha=0.2,
                                color=line.get_color(), linewidth=0)
                banded = True
        ax.set_xlabel("epochs of the unique tokens" if plot.x == "epochs" else "training step")
        bars = "band" if banded else "curve"
    if plot.xlabel:
        ax.set_xlabel(plot.xlabel)
    if plot.logy:
        ax.set_yscale("log")
    if plot.logx:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        low, high = ax.get_xlim()
        if high / max(low, 1e-300) < 1e3:  # up to three decades: 1, 2, 5, 10, 20, 50 ... labelled
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        if 1 < len(x_values) <= 10:  # a swept axis: a tick at each of its values
            ax.set_xticks(sorted(x_values))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))  # 0.01, 1, 64: not 10^-2
        ax.xaxis.set_minor_formatter(NullFormatter())
    detail = {"": "", "curve": "\n(mean over seeds)", "band": "\n(mean over seeds; band: ± 1 std over seeds)"}.get(
        bars, f"\n(mean over seeds; {bars})")
    ax.set_ylabel(f"{plot.label or plot.y}{detail}", fontsize=8)
    where = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in plot.where.items())
    ax.set_title(study.study + (f" ({where})" if where else ""), fontsize=10)  # the y label names the metric
    ax.grid(alpha=0.3)
    entries = len(ax.get_legend_handles_labels()[0])
    if entries > (3 if plot.kind == "curve" else 5):  # many lines: the legend beside the axes, hiding none of them
        fig.set_figwidth(fig.get_figwidth() + 2.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif entries:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"{plot.name or f'{plot.y}_vs_{plot.x}'}.png"
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _draw_experts(ax, plot: PlotSpec, study: StudyConfig, table: list[dict[str, Any]]) -> str:
    """An `experts` plot: each row's `task.style@k<K>.metric` against k (mean ± std over seeds); a row with
    only `task.style.metric` (evaluated as saved, a dense model) as a dashed horizontal line, its std a band."""
    task, style, metric = plot.y.split(".")
    per_k = re.compile(rf"^{re.escape(task)}\.{re.escape(style)}{re.escape(EXPERTS_MARK)}(\d+)\.{re.escape(metric)}_mean$")
    levels: set[int] = set()
    for row in table:
        label = ", ".join(f"{a.rsplit('.', 1)[-1]}={row.get(a)}" for a in study.axes) or "all runs"
        points = sorted((int(m.group(1)), row[key], row.get(key.replace("_mean", "_std"), 0.0))
                        for key in row if (m := per_k.match(key)))
        if points:
            k, mean, std = zip(*points, strict=True)
            ax.errorbar(k, mean, yerr=[e if isinstance(e, float) and math.isfinite(e) else 0.0 for e in std],
                        marker="o", capsize=3, label=label)
            levels.update(k)
        elif f"{plot.y}_mean" in row:
            mean, std = row[f"{plot.y}_mean"], row.get(f"{plot.y}_std", 0.0)
            line = ax.axhline(mean, linestyle="--", color="0.3", label=f"{label} (no experts; band ± 1 std)")
            if isinstance(std, float) and math.isfinite(std) and std > 0:
                ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.12, linewidth=0)
    if levels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(levels), [str(k) for k in sorted(levels)])
    ax.set_xlabel("active experts per token at inference (k)")
    return "bars: ± 1 std over seeds"


def curve_points(run_dir: Path, key: str, x: str = "step") -> list[tuple[float, float]]:
    """(step, value) of a metrics.jsonl key, or of an evaluator column `task.style.metric` over the run's
    evaluated checkpoints, in step order; with `x="epochs"`, (epochs of the U unique tokens, value) for a
    repetition run (none for a run without repetition)."""
    if key.count(".") == 2:
        points = evaluator_series(results_path(run_dir)).get(key, [])
    else:
        path = run_dir / METRICS
        points = [(r["step"], r[key]) for r in (read_jsonl(path) if path.is_file() else [])
                  if isinstance(r.get(key), (int, float))]
    if x == "step":
        return points
    scale = epochs_per_step(run_dir)
    return [] if scale is None else [(step * scale, value) for step, value in points]


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
