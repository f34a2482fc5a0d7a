"""Checkpoint choice by a task metric (`select:` in the study YAML), and the test set scored only there.

    select:
      by: arithmetic_validation.zero_shot.exact_match   # an evaluator column the runs write on save
      best: max
      test: [arithmetic_in_dist:zero_shot]              # tasks (TASK[:STYLE,...]) scored at that checkpoint only
      limit: 500                                        # items per test task
      base: true                                        # and the model each run started from, on the same items

Each run's checkpoint is the evaluated one with the best `by` (ties: the earlier step), chosen on a validation
set of its own, never on the test scores. Once a run has trained, the study scores its `test` tasks at that
checkpoint into `<run>/test/` and, with `base`, the model it started from into `<run>/test-base/` (the evaluator's
command, `workbench_cli.eval --step` / `--base`, in the run's slot); the table gets `test@<task.style.metric>`,
`base@<task.style.metric>` and `best@<task.style.metric>` (every on-save column at the chosen checkpoint,
`best_eval_step` its step)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workbench.io import read_jsonl
from workbench.layout import RESULTS

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


def scoring_commands(run_dir: Path, spec: SelectSpec, step: int) -> list[list[str]]:
    """The evaluator's command lines that score `spec.test` at checkpoint `step` of `run_dir` and, with
    `spec.base`, on the model the run started from (by module name: the library does not import the evaluator)."""
    tasks = [part for task in spec.test for part in ("--task", task)]
    head = [sys.executable, "-m", "workbench_cli.eval", str(run_dir), "--limit", str(spec.limit), *tasks]
    commands = [[*head, "--step", str(step), "--out", str(run_dir / TEST_DIR)]]
    if spec.base:
        commands.append([*head, "--base", "--out", str(run_dir / BASE_DIR)])
    return commands


def scoring_done(run_dir: Path, spec: SelectSpec, step: int) -> bool:
    """Every test task has a score at `step` (and on the base model, with `spec.base`)."""
    def tasks_in(results: Path, at: int | None) -> set[str]:
        return {r["task"] for r in _records(results) if at is None or r["step"] == at}

    wanted = {task.split(":", 1)[0] for task in spec.test}
    done = wanted <= tasks_in(run_dir / TEST_DIR / RESULTS, step)
    return done and (not spec.base or wanted <= tasks_in(run_dir / BASE_DIR / RESULTS, None))
