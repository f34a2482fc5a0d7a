"""Studies: a grid of training runs from one base config, run resumably, collected into one table.

A study YAML:

    study: repetition-quick                      # runs go to <runs_dir>/<study>/<run name>/
    base: configs/quickstart.yaml                # an experiment config
    set: {training.max_steps: 64}                # overrides shared by every run
    axes:                                        # key -> values; the grid is their product (or zip)
      data.repetition.unique_tokens: [65536, 16384]
      model.preset: [pythia-tiny, pythia-small]
    combine: product                             # product | zip
    seeds: [0, 1, 2]
    launcher: {kind: python}                     # python | deepspeed (with num_gpus)
    collect: [eval_loss, loss]                   # metrics.jsonl keys: final value, and min + its step

Each run goes through `launch/train.py` (so `deepspeed` with several ranks works the same), with its axis
values as `--set` overrides and `--resume`, so a killed run continues from its checkpoint.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from workbench.config import REPO_ROOT, load_config, override_string, parse_yaml, resolve_path, validate_model
from workbench.errors import ConfigError
from workbench.io import atomic_write_text, read_jsonl

STATUS = "study_status.json"


class Launcher(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["python", "deepspeed"] = "python"
    num_gpus: int = Field(1, ge=1, description="ranks per run under deepspeed (GPUs, or CPU processes)")


class PlotSpec(BaseModel):
    """A PNG of the study: `final` = a collected column against an axis (mean ± std over seeds), one line per
    value of `group`; `curve` = a metrics.jsonl key against step, one line per run (mean over seeds)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["final", "curve"] = "final"
    x: str = "step"  # an axis for `final`
    y: str  # a collected column (`final`) or a metrics.jsonl key (`curve`)
    group: str | None = None  # an axis: one line per value
    logx: bool = False
    name: str | None = None  # file name (default from y and x)


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    combine: Literal["product", "zip"] = "product"
    seeds: list[int] = Field(default_factory=lambda: [0])
    runs_dir: str = "runs"
    launcher: Launcher = Field(default_factory=Launcher)
    collect: list[str] = Field(default_factory=lambda: ["eval_loss", "loss"])
    plots: list[PlotSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its name, axis values, seed and folder."""

    name: str
    values: dict[str, Any]
    seed: int
    run_dir: Path

    def overrides(self, study: StudyConfig) -> list[str]:
        pairs = {**study.set, **self.values, "seed": self.seed, "name": self.name,
                 "runs_dir": str(Path(study.runs_dir) / study.study)}
        return [override_string(key, value) for key, value in pairs.items()]


def load_study(path: str | Path) -> StudyConfig:
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' not found")
    study = validate_model(StudyConfig, parse_yaml(path.read_text()) or {}, path)
    if study.combine == "zip" and len({len(v) for v in study.axes.values()}) > 1:
        raise ConfigError(f"{path}: field 'axes': zipped axes need the same number of values")
    load_config(study.base, [override_string(k, v) for k, v in study.set.items()])  # a bad base config or override fails here, before any run
    return study


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", str(value)).strip("-")


def grid(study: StudyConfig) -> list[RunSpec]:
    """Every run of the study, in a fixed order, named from its axis values and seed."""
    keys = list(study.axes)
    values = zip(*study.axes.values(), strict=True) if study.combine == "zip" else itertools.product(
        *study.axes.values())
    runs = []
    for combo in values:
        assignment = dict(zip(keys, combo, strict=True))
        for seed in study.seeds:
            parts = [f"{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in assignment.items()] + [f"seed={seed}"]
            name = "_".join(parts)
            runs.append(RunSpec(name, assignment, seed, Path(study.runs_dir) / study.study / name))
    return runs


def run_status(run: RunSpec) -> dict[str, Any]:
    path = run.run_dir / STATUS
    return yaml.safe_load(path.read_text()) if path.is_file() else {"status": "pending"}


def train_command(study: StudyConfig, run: RunSpec, port: int = 29500) -> list[str]:
    script = str(REPO_ROOT / "launch" / "train.py")
    base = str(resolve_path(study.base))
    if study.launcher.kind == "deepspeed":
        launcher = str(Path(sys.executable).parent / "deepspeed")
        head = [launcher, "--num_gpus", str(study.launcher.num_gpus), "--master_port", str(port), script, base]
    else:
        head = [sys.executable, script, base]
    return head + [arg for o in run.overrides(study) for arg in ("--set", o)] + ["--resume"]


def execute(study: StudyConfig, run: RunSpec, threads: int | None = None, port: int = 29500) -> dict[str, Any]:
    """Train one run (resuming it if it was killed); record done or failed with the error; never raise."""
    if run_status(run)["status"] == "done":
        return run_status(run)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = run.run_dir / "train.log"
    start = time.time()
    with log.open("a") as handle:
        result = subprocess.run(train_command(study, run, port), cwd=REPO_ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
    status: dict[str, Any] = {"status": "done" if result.returncode == 0 else "failed",
                              "seconds": round(time.time() - start, 1), "returncode": result.returncode}
    if result.returncode != 0:
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        status["error"] = errors[-1] if errors else log.read_text().splitlines()[-1:]
    atomic_write_text(run.run_dir / STATUS, yaml.safe_dump(status))
    return status


def collect_run(run: RunSpec, keys: list[str]) -> dict[str, Any]:
    """Final value, minimum and step of the minimum of each metrics.jsonl key of one run."""
    row: dict[str, Any] = {"run": run.name, "seed": run.seed, **run.values, "status": run_status(run)["status"]}
    metrics = run.run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.is_file() else []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        best = min(points, key=lambda p: p[1])
        row.update({key: points[-1][1], f"min_{key}": best[1], f"argmin_{key}": best[0]})
    row.update(final_eval_scores(run.run_dir / "eval" / "results.jsonl"))
    return row


def final_eval_scores(results: Path) -> dict[str, float]:
    """`task.style.metric` -> score at the run's last evaluated checkpoint (from the BOSE evaluator)."""
    records = [r for r in (read_jsonl(results) if results.is_file() else [])
               if r.get("status", "ok") == "ok" and r.get("step") is not None]
    if not records:
        return {}
    last = max(r["step"] for r in records)
    return {f"{r['task']}.{r['style']}.{r['metric']}": r["value"] for r in records if r["step"] == last}


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
        out.append(entry)
    return out
