"""Collecting runs into rows and a table over seeds: a study's runs, or runs launched by hand (`--collect`).

Runs launched by hand become a study without a YAML (`hand_study`): its axes are the config values in which
the runs differ (read from each run's `config.yaml`), its seeds their seeds, so runs that differ only by
seed are pooled into one row of the table.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import ConfigError
from workbench.io import read_jsonl
from workbench.layout import METRICS, RESULTS, RUN_CONFIG, results_path
from workbench.stats import t_interval
from workbench.study.plan import PlotSpec, RunSpec, StudyConfig, check_collect_items, collected
from workbench.study.runner import run_status
from workbench.study.selection import (
    TEST_DIR,
    NoiseSpec,
    SelectSpec,
    base_dir,
    noise_columns,
    scores_at,
    selected_step,
)

IGNORED = ("name", "runs_dir", "seed", "resume_from_checkpoint")  # config fields that are not a difference


def collect_run(run: RunSpec, keys: list[str], select: SelectSpec | None = None, spread_from: int | None = None,
                noise: NoiseSpec | None = None) -> dict[str, Any]:
    """For each collected metrics.jsonl key of one run: its final value and (`key:min`, the default, or
    `key:max`) its best value `best_<key>` and the step of it `best_step_<key>` (`key:first`: its first logged
    value `first_<key>` and step `first_step_<key>`). Evaluator scores: at the last checkpoint, at the chosen one
    (`best@`: by `select.by`, else the lowest validation loss) and, with `select.test`, `test@` / `base@`.
    `key:spread` columns count the checkpoints from step `spread_from` on; with `noise`, `noise@<column>` is the
    variance of a column over the re-scorings of one checkpoint and `excess@<column>` = `res@` minus it."""
    row: dict[str, Any] = {"run": run.name, "seed": run.seed, **run.values, "status": run_status(run)["status"]}
    metrics = run.run_dir / METRICS
    records = read_jsonl(metrics) if metrics.is_file() else []
    evaluated = None
    def windowed(key: str, points: list[tuple[int, float]]) -> dict[str, float]:
        kept = [(step, value) for step, value in points if spread_from is None or step >= spread_from]
        return spread(key, [v for _, v in kept], [s for s, _ in kept])

    for key, direction in collected(keys).items():
        if direction == "spread" and key.count(".") == 2:  # an evaluator column: its values over checkpoints
            evaluated = evaluator_series(results_path(run.run_dir)) if evaluated is None else evaluated
            row.update(windowed(key, evaluated.get(key, [])))
            continue
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        row[key] = points[-1][1]
        if direction == "spread":
            row.update(windowed(key, points))
        elif direction == "first":
            row.update({f"first_{key}": points[0][1], f"first_step_{key}": points[0][0]})
        elif direction != "last":
            best = (max if direction == "max" else min)(points, key=lambda p: p[1])
            row.update({f"best_{key}": best[1], f"best_step_{key}": best[0]})
    if noise is not None:
        row.update(noise_columns(run.run_dir, noise, row))
    row.update(run_columns(run.run_dir))
    row.update(final_eval_scores(results_path(run.run_dir)))
    if select is None:
        row.update(eval_scores_at_best_validation(results_path(run.run_dir), records))
        return row
    step = selected_step(results_path(run.run_dir), select)
    if step is not None:
        row.update({**scores_at(results_path(run.run_dir), step, "best@"), "best_eval_step": step})
        row.update(scores_at(run.run_dir / TEST_DIR / RESULTS, step, "test@"))
    row.update(scores_at(base_dir(run.run_dir, run.settings, select) / RESULTS, None, "base@"))
    return row


def run_columns(run_dir: Path) -> dict[str, float]:
    """`parameters` (of the newest complete checkpoint, from its safetensors headers) and, for a repetition
    run (`data.repetition`), its `epochs` D/U and `unique_tokens_per_parameter` U/parameters."""
    from safetensors import safe_open

    from workbench.checkpoints import newest_complete_checkpoint

    out: dict[str, float] = {}
    checkpoint = newest_complete_checkpoint(run_dir, report=lambda _: None) if run_dir.is_dir() else None
    if checkpoint is not None:
        total = 0
        for path in checkpoint.glob("*.safetensors"):
            with safe_open(str(path), framework="numpy") as weights:
                total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
        if total:
            out["parameters"] = float(total)
    repetition = _repetition(run_dir)
    if repetition is not None:
        out["epochs"] = repetition.epochs
        if "parameters" in out:
            out["unique_tokens_per_parameter"] = repetition.unique_tokens / out["parameters"]
    return out


def _repetition(run_dir: Path):
    """The run's RepetitionConfig, or None when it has none."""
    from workbench.data.repetition import RepetitionConfig

    path = run_dir / RUN_CONFIG
    options = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("repetition") if path.is_file() else None
    return RepetitionConfig(**options) if options else None


def epochs_per_step(run_dir: Path) -> float | None:
    """Epochs of a repetition run's U unique tokens per training step (from the Trainer's epoch in metrics.jsonl,
    which counts passes over the whole D-token stream, times D/U); None for a run without repetition."""
    repetition = _repetition(run_dir)
    path = run_dir / METRICS
    records = [r for r in (read_jsonl(path) if path.is_file() else []) if r.get("step") and r.get("epoch")]
    if repetition is None or not records:
        return None
    return records[-1]["epoch"] / records[-1]["step"] * repetition.epochs


def evaluator_series(results: Path) -> dict[str, list[tuple[int, float]]]:
    """`task.style.metric` -> (step, value) at the evaluated checkpoints, in step order."""
    records = sorted((r for r in (read_jsonl(results) if results.is_file() else [])
                      if r.get("status", "ok") == "ok" and isinstance(r.get("step"), int)), key=lambda r: r["step"])
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        series.setdefault(f"{r['task']}.{r['style']}.{r['metric']}", []).append((r["step"], r["value"]))
    return series


def spread(key: str, values: list[float], steps: list[float] | None = None) -> dict[str, float]:
    """How much a metric moves over a run's checkpoints (`collect: key:spread`): `var@key`, the sample variance
    of its values; `osc@key`, half the mean squared change between consecutive checkpoints (von Neumann's
    estimator: a linear trend adds only its squared step / 2, but a curved learning curve still adds to it);
    `res@key`, the variance of the residuals around the least-squares line through (step, value) (n - 2 degrees
    of freedom: the oscillation with a linear trend removed exactly). `steps` default to 0, 1, 2, ... Needs at
    least 3 values."""
    points = [(float(x), float(v)) for x, v in zip(steps if steps is not None else range(len(values)), values,
                                                     strict=True) if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(points) < 3:
        return {}
    finite = [v for _, v in points]
    mean = sum(finite) / len(finite)
    variance = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    oscillation = sum((b - a) ** 2 for a, b in zip(finite, finite[1:], strict=False)) / (2 * (len(finite) - 1))
    x_mean = sum(x for x, _ in points) / len(points)
    sxx = sum((x - x_mean) ** 2 for x, _ in points)
    slope = sum((x - x_mean) * (v - mean) for x, v in points) / sxx if sxx else 0.0
    residual = sum((v - mean - slope * (x - x_mean)) ** 2 for x, v in points) / (len(points) - 2)
    return {f"var@{key}": variance, f"osc@{key}": oscillation, f"res@{key}": residual}


def final_eval_scores(results: Path) -> dict[str, float]:
    """`task.style.metric` -> score at the run's last evaluated checkpoint (from the BOSE evaluator)."""
    records = [r for r in (read_jsonl(results) if results.is_file() else [])
               if r.get("status", "ok") == "ok" and r.get("step") is not None]
    if not records:
        return {}
    last = max(r["step"] for r in records)
    return {f"{r['task']}.{r['style']}.{r['metric']}": r["value"] for r in records if r["step"] == last}


def eval_scores_at_best_validation(results: Path, records: list[dict[str, Any]]) -> dict[str, float]:
    """`best@task.style.metric` -> score at the evaluated checkpoint whose logged validation loss (`eval_loss`)
    is lowest: each run at its own best training length, chosen on held-out data, never on the scores
    themselves (ties go to the earlier step). Also `best_eval_step`, that checkpoint's step."""
    losses = {r["step"]: r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))}
    evaluated = [r for r in (read_jsonl(results) if results.is_file() else [])
                 if r.get("status", "ok") == "ok" and r.get("step") in losses]
    if not evaluated:
        return {}
    best = min({r["step"] for r in evaluated}, key=lambda step: (losses[step], step))
    scores = {f"best@{r['task']}.{r['style']}.{r['metric']}": r["value"] for r in evaluated if r["step"] == best}
    return {**scores, "best_eval_step": best}


def aggregate(rows: list[dict[str, Any]], axes: list[str], keys: list[str]) -> list[dict[str, Any]]:
    """Mean, standard deviation and count over seeds for each combination of axis values."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(a)) for a in axes), []).append(row)
    out = []
    for combo, members in groups.items():
        entry: dict[str, Any] = dict(zip(axes, combo, strict=True))
        for key in keys:
            values = [m[key] for m in members if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
            if values:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                entry.update({f"{key}_mean": mean, f"{key}_std": std, f"{key}_n": len(values)})
                if key.startswith("delta_"):  # a paired difference: its 95% interval over seeds
                    entry[f"{key}_ci95"] = t_interval(values)
        out.append(entry)
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `{dotted.key: value}` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def hand_study(run_dirs: list[str | Path], metrics: list[str] | None = None,
               out: str | Path | None = None) -> tuple[StudyConfig, list[RunSpec], Path]:
    """Runs launched by hand as a study: (its config, its runs, the folder for its tables and report).

    Each folder must hold the `config.yaml` that `launch/train.py` writes. The axes are the config fields
    whose values differ between the runs (besides name, runs_dir and seed); `metrics` are `collect` entries
    (default: the study default); `out` defaults to `collected/` beside the runs. Raises a ConfigError naming
    the folder or the option at fault, before anything is written."""
    if not run_dirs:
        raise ConfigError("--collect: give one or more run folders")
    folders = [Path(d) for d in run_dirs]
    seen: set[Path] = set()
    configs = []
    for folder in folders:
        if folder.resolve() in seen:
            raise ConfigError(f"--collect: run folder '{folder}' is given twice")
        seen.add(folder.resolve())
        path = folder / RUN_CONFIG
        if not path.is_file():
            what = "not found" if not folder.is_dir() else "has no config.yaml (not a run of launch/train.py)"
            raise ConfigError(f"--collect: run folder '{folder}' {what}")
        try:
            configs.append(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as err:
            raise ConfigError(f"--collect: '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        check_collect_items(metrics or [])
    except ValueError as err:
        raise ConfigError(f"--metric: {err}") from None
    flat = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f if k not in IGNORED))
    axes = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    runs = [RunSpec(str(folder), {a: f.get(a) for a in axes}, c.get("seed"), folder, config=str(folder / RUN_CONFIG),
                    stage="hand") for folder, f, c in zip(folders, flat, configs, strict=True)]
    out = Path(out) if out is not None else Path(os.path.commonpath([f.resolve() for f in folders])) / "collected"
    if out.resolve() in seen:
        raise ConfigError(f"--out '{out}' is one of the run folders")
    differ = ", ".join(axes) or "nothing but the seed"
    study = StudyConfig(
        study=re.sub(r"[^A-Za-z0-9_.\-]+", "-", out.name) or "collected",
        description=f"Runs launched by hand, collected with `launch/study.py --collect`; they differ in: {differ}.",
        base=runs[0].config, runs_dir=str(out.parent), seeds=sorted({r.seed for r in runs if r.seed is not None}),
        axes={a: list(dict.fromkeys(str(f.get(a)) for f in flat)) for a in axes},
        **({"collect": metrics} if metrics else {}))
    study.plots.extend(PlotSpec(kind="curve", y=key, name=f"{_file_name(key)}_curves") for key in collected(study.collect))
    return study, runs, out


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", key)
