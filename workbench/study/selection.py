"""Checkpoint choice by a task metric (`select:` in the study YAML), and the test set scored only there.

    select:
      by: arithmetic_validation.zero_shot.exact_match   # an evaluator column the runs write on save
      best: max
      test: [arithmetic_in_dist:zero_shot]              # tasks (TASK[:STYLE,...]) scored at that checkpoint only
      limit: 500                                        # items per test task
      base: true                                        # and the model each run started from, on the same items

Each run's checkpoint is the evaluated one with the best `by` (ties: the earlier step), chosen on a validation
set of its own, never on the test scores. Once a run has trained, the study scores its `test` tasks at that
checkpoint into `<run>/test/` and, with `base`, the model it started from (once per base and set of test items, `base_dir`; the evaluator's
command, `workbench_cli.eval --step` / `--base`, in the run's slot); the table gets `test@<task.style.metric>`,
`base@<task.style.metric>` and `best@<task.style.metric>` (every on-save column at the chosen checkpoint,
`best_eval_step` its step)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workbench.io import read_jsonl
from workbench.layout import RESULTS, results_path

EVAL_MODULE = "workbench_cli.eval"  # by name: the library does not import the evaluator
START = "model.name_or_path"  # the setting that names the model a run starts from
TEST_DIR = "test"  # <run>/test/results.jsonl: the test tasks at the chosen checkpoint
BASE_DIR = "test-base"  # <run>/test-base/results.jsonl: the test tasks on the model the run started from


class SelectSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str = Field(pattern=r"^[^.@]+\.[^.]+\.[^.]+$")  # task.style.metric, evaluated on save
    best: Literal["min", "max"] = "max"
    test: list[str] = Field(default_factory=list)  # TASK[:STYLE,...] as `workbench eval --task` takes them
    limit: int = Field(500, ge=1)
    base: bool = False


def _records(results: Path) -> list[dict[str, Any]]:
    return [r for r in (read_jsonl(results) if results.is_file() else [])
            if r.get("status", "ok") == "ok" and isinstance(r.get("step"), int)]


def _column(record: dict[str, Any]) -> str:
    return f"{record['task']}.{record['style']}.{record['metric']}"


def selected_step(results: Path, spec: SelectSpec) -> int | None:
    """The evaluated step with the best `spec.by` in a run's on-save results (ties: the earlier step)."""
    scores = {r["step"]: r["value"] for r in _records(results) if _column(r) == spec.by}
    if not scores:
        return None
    sign = -1.0 if spec.best == "max" else 1.0
    return min(scores, key=lambda step: (sign * scores[step], step))


def scores_at(results: Path, step: int | None, prefix: str) -> dict[str, float]:
    """`<prefix><task.style.metric>` -> value at `step` (None: every record, for a one-checkpoint file)."""
    return {f"{prefix}{_column(r)}": r["value"] for r in _records(results) if step is None or r["step"] == step}


def base_dir(run_dir: Path, settings: dict[str, Any], spec: SelectSpec) -> Path:
    """Where the base model's test scores of a run go: beside the model it started from (`model.name_or_path`,
    a study's pretrain run), one folder per set of test items (the run's `data.*` settings, the tasks and limit),
    so the arms of one seed score their shared base once; `<run>/test-base` for a run without such a start."""
    start = settings.get(START)
    if not start:
        return run_dir / BASE_DIR
    items = {k: v for k, v in sorted(settings.items()) if k.startswith("data.")} | {"test": spec.test, "n": spec.limit}
    return Path(start) / f"{BASE_DIR}-{hashlib.sha1(json.dumps(items, default=str).encode()).hexdigest()[:10]}"


def scoring_commands(run_dir: Path, spec: SelectSpec, step: int, base: Path) -> list[list[str]]:
    """The arguments of the evaluator's command (EVAL_MODULE) that score `spec.test` at checkpoint `step` of
    `run_dir` and, with `spec.base`, on the model the run started from into `base`."""
    tasks = [part for task in spec.test for part in ("--task", task)]
    head = [str(run_dir), "--limit", str(spec.limit), *tasks]
    commands = [[*head, "--step", str(step), "--out", str(run_dir / TEST_DIR)]]
    if spec.base:
        commands.append([*head, "--base", "--out", str(base)])
    return commands


def scoring_done(run_dir: Path, spec: SelectSpec, step: int, base: Path) -> bool:
    """Every test task has a score at `step` (and on the base model, in `base`, with `spec.base`)."""
    def tasks_in(results: Path, at: int | None) -> set[str]:
        return {r["task"] for r in _records(results) if at is None or r["step"] == at}

    wanted = {task.split(":", 1)[0] for task in spec.test}
    done = wanted <= tasks_in(run_dir / TEST_DIR / RESULTS, step)
    return done and (not spec.base or wanted <= tasks_in(base / RESULTS, None))


NOISE_DIR = "noise"  # <run>/noise/seed=<k>/: one checkpoint re-scored with another sampling seed
NOISE_SEED_STRIDE = 1000  # re-scoring k samples prompt i with seed 1000 k + i (the on-save scores use 0 + i)


class NoiseSpec(BaseModel):
    """The Monte-Carlo noise floor of sampled metrics (`noise:` in the study YAML): each run's last evaluated
    checkpoint re-scored on `tasks` with `seeds` other sampling seeds (`eval.style_options.eigenscore.seed`), on
    `limit` items; `noise@<column>` is the variance of a column over those scorings, the part of a checkpoint-to-
    checkpoint spread that the estimator's sampling alone produces, and `excess@<column>` = `res@<column>` - it."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1)  # TASK[:STYLE,...]
    seeds: int = Field(5, ge=2)
    limit: int = Field(ge=1)


def last_step(results: Path) -> int | None:
    """The newest evaluated step in a run's on-save results."""
    steps = [r["step"] for r in _records(results)]
    return max(steps) if steps else None


def noise_commands(run_dir: Path, spec: NoiseSpec, step: int, eval_section: dict[str, Any]
                   ) -> list[tuple[Path, list[str]]]:
    """Per re-scoring k = 1..seeds not yet done: (the eval YAML to write, the evaluator's arguments) scoring
    `spec.tasks` at checkpoint `step` with the sampling seed NOISE_SEED_STRIDE * k into `<run>/noise/seed=<k>/`."""
    out = []
    wanted = {task.split(":", 1)[0] for task in spec.tasks}
    for k in range(1, spec.seeds + 1):
        folder = run_dir / NOISE_DIR / f"seed={k}"
        if wanted <= {r["task"] for r in _records(folder / RESULTS) if r["step"] == step}:
            continue
        options = dict(eval_section.get("style_options") or {})
        options["eigenscore"] = {**(options.get("eigenscore") or {}), "seed": NOISE_SEED_STRIDE * k}
        config = folder / "eval.yaml"
        tasks = [part for task in spec.tasks for part in ("--task", task)]
        out.append((config, [str(run_dir), "--step", str(step), "--limit", str(spec.limit), *tasks,
                             "--config", str(config), "--out", str(folder)]))
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({"eval": {**eval_section, "style_options": options}}))
    return out


def noise_columns(run_dir: Path, spec: NoiseSpec, row: dict[str, Any]) -> dict[str, float]:
    """`noise@<column>`: the sample variance of each column over the run's re-scorings (at least 2), and
    `excess@<column>` = `res@<column>` - `noise@<column>` where the row has the former."""
    step = last_step(results_path(run_dir))
    values: dict[str, list[float]] = {}
    for k in range(1, spec.seeds + 1):
        for column, value in scores_at(run_dir / NOISE_DIR / f"seed={k}" / RESULTS, step, "").items():
            values.setdefault(column, []).append(value)
    out = {}
    for column, scores in values.items():
        if len(scores) >= 2:
            mean = sum(scores) / len(scores)
            out[f"noise@{column}"] = sum((v - mean) ** 2 for v in scores) / (len(scores) - 1)
            if isinstance(row.get(f"res@{column}"), (int, float)):
                out[f"excess@{column}"] = row[f"res@{column}"] - out[f"noise@{column}"]
    return out
