"""Studies: a grid of training runs from one base config, run resumably, collected into one table.

A study YAML:

    study: repetition-quick                      # runs go to <runs_dir>/<study>/<run name>/
    base: configs/quickstart.yaml                # an experiment config
    set: {training.max_steps: 64}                # overrides shared by every run
    axes:                                        # key -> values; the grid is their product (or zip)
      data.repetition.unique_tokens: [65536, 16384]
      model.preset: [pythia-tiny, pythia-small]
      regulariser:                               # a named-variant axis: name -> the overrides it sets
        none: {}
        dropout-0.1: {methods.dropout_schedule.rate: 0.1}
    combine: product                             # product | zip
    seeds: [0, 1, 2]
    launcher: {kind: python}                     # python | deepspeed (with num_gpus)
    collect: [eval_loss, eval_token_accuracy:max, train_runtime:last]  # final value, best value + its step
    profiles: {quick: {seeds: [0]}}              # smaller/larger grids: --quick, --scale, --profile NAME

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

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from workbench.config import REPO_ROOT, load_config, override_string, parse_yaml, resolve_path, validate_model
from workbench.errors import ConfigError
from workbench.io import atomic_write_text, read_jsonl

STATUS = "study_status.json"
DIRECTIONS = ("min", "max", "last")  # what the best value of a collected key is (`last`: none)


def collected(items: list[str]) -> dict[str, str]:
    """`collect` entries (`key`, `key:min`, `key:max`, `key:last`) -> {key: what its best value is}."""
    return {key: direction or "min" for key, _, direction in (item.partition(":") for item in items)}


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
    where: dict[str, Any] = Field(default_factory=dict)  # only the runs with these axis values
    name: str | None = None  # file name (default from y and x)


class DeltaSpec(BaseModel):
    """Per run, `delta_<key>` = its final value minus that of the run with `axis` = `reference` and the same
    other axis values and seed (a paired difference, then averaged over seeds like every column)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["delta"] = "delta"
    axis: str
    reference: Any
    keys: list[str]


class AgreementSpec(BaseModel):
    """Do the groups of `group` agree on the best value of axis `x` for `y`? Best x per group (mean over
    seeds, and per seed), Kendall's tau between the groups' y-vs-x curves, and each group's cost."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["agreement"] = "agreement"
    group: str
    x: str
    y: str
    cost: list[str] = Field(default_factory=lambda: ["train_runtime", "total_flos"])


class StudyProfile(BaseModel):
    """A smaller or larger version of the study (`--quick`, `--scale`): its own seeds, axis values and
    overrides; its runs go to `<study>-<profile>` so they never mix with the default grid's."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    seeds: list[int] | None = None
    set: dict[str, Any] = Field(default_factory=dict)  # merged over the study's `set`
    axes: dict[str, list[Any] | dict[str, dict[str, Any]]] = Field(default_factory=dict)  # replaces these axes


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any] | dict[str, dict[str, Any]]] = Field(default_factory=dict)
    combine: Literal["product", "zip"] = "product"
    seeds: list[int] = Field(default_factory=lambda: [0])
    runs_dir: str = "runs"
    launcher: Launcher = Field(default_factory=Launcher)
    collect: list[str] = Field(default_factory=lambda: ["eval_loss", "loss"])
    plots: list[PlotSpec] = Field(default_factory=list)
    compare: list[DeltaSpec | AgreementSpec] = Field(default_factory=list)
    profiles: dict[str, StudyProfile] = Field(default_factory=dict)
    profile: str | None = None  # the profile this config was made from (set by `with_profile`)

    @pydantic.field_validator("collect")
    @classmethod
    def _check_collect(cls, value: list[str]) -> list[str]:
        for item in value:
            if item.partition(":")[2] not in ("", *DIRECTIONS):
                raise ValueError(f"collect '{item}': write key, key:min, key:max or key:last")
        return value

    def with_profile(self, name: str) -> StudyConfig:
        """This study as its profile `name` says (runs under `<study>-<name>`)."""
        if name not in self.profiles:
            raise ConfigError(f"study '{self.study}' has no profile '{name}'; it has: "
                              f"{', '.join(self.profiles) or '(none)'}")
        profile = self.profiles[name]
        unknown = [axis for axis in profile.axes if axis not in self.axes]
        if unknown:
            raise ConfigError(f"profile '{name}': axis '{unknown[0]}' is not an axis of the study")
        return self.model_copy(update={
            "study": f"{self.study}-{name}", "profile": name, "seeds": profile.seeds or self.seeds,
            "set": {**self.set, **profile.set}, "axes": {**self.axes, **profile.axes},
            "description": profile.description or self.description})


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its name, axis values (a variant axis gives its variant's name), seed, folder and
    the config overrides its axis values stand for."""

    name: str
    values: dict[str, Any]
    seed: int
    run_dir: Path
    settings: dict[str, Any]

    def overrides(self, study: StudyConfig) -> list[str]:
        pairs = {**study.set, **self.settings, "seed": self.seed, "name": self.name,
                 "runs_dir": str(Path(study.runs_dir) / study.study)}
        return [override_string(key, value) for key, value in pairs.items()]


def load_study(path: str | Path, profile: str | None = None) -> StudyConfig:
    """Read and check a study YAML (as profile `profile`, if given); every run's config is validated here,
    so a bad base config, override or variant fails before any run starts."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' not found")
    study = validate_model(StudyConfig, parse_yaml(path.read_text()) or {}, path)
    if profile is not None:
        study = study.with_profile(profile)
    if study.combine == "zip" and len({len(v) for v in study.axes.values()}) > 1:
        raise ConfigError(f"{path}: field 'axes': zipped axes need the same number of values")
    checked: set[str] = set()
    for run in grid(study):
        overrides = [o for o in run.overrides(study) if not o.startswith(("seed=", "name=", "runs_dir="))]
        if str(overrides) not in checked:
            checked.add(str(overrides))
            try:
                load_config(study.base, overrides)
            except ConfigError as err:
                raise ConfigError(f"{path}: run '{run.name}': {err}") from None
    return study


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", str(value)).strip("-")


def grid(study: StudyConfig) -> list[RunSpec]:
    """Every run of the study, in a fixed order, named from its axis values and seed."""
    keys = list(study.axes)
    choices = [[(name, dict(overrides)) for name, overrides in values.items()] if isinstance(values, dict)
               else [(value, {axis: value}) for value in values] for axis, values in study.axes.items()]
    combos = zip(*choices, strict=True) if study.combine == "zip" else itertools.product(*choices)
    runs = []
    for combo in combos:
        labels = {axis: label for axis, (label, _) in zip(keys, combo, strict=True)}
        settings = {k: v for _, overrides in combo for k, v in overrides.items()}
        for seed in study.seeds:
            parts = [f"{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in labels.items()] + [f"seed={seed}"]
            name = "_".join(parts)
            runs.append(RunSpec(name, labels, seed, Path(study.runs_dir) / study.study / name, settings))
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
    status = run_status(run)
    if status["status"] == "done":
        return {**status, "skipped": True}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = run.run_dir / "train.log"
    start = time.time()
    with log.open("a") as handle:
        result = subprocess.run(train_command(study, run, port), cwd=REPO_ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
    status = {"status": "done" if result.returncode == 0 else "failed",
                              "seconds": round(time.time() - start, 1), "returncode": result.returncode}
    if result.returncode != 0:
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        status["error"] = errors[-1] if errors else log.read_text().splitlines()[-1:]
    atomic_write_text(run.run_dir / STATUS, yaml.safe_dump(status))
    return status


def collect_run(run: RunSpec, keys: list[str]) -> dict[str, Any]:
    """For each collected metrics.jsonl key of one run: its final value and (`key:min`, the default, or
    `key:max`) its best value `best_<key>` and the step of it `best_step_<key>`."""
    row: dict[str, Any] = {"run": run.name, "seed": run.seed, **run.values, "status": run_status(run)["status"]}
    metrics = run.run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.is_file() else []
    for key, direction in collected(keys).items():
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        row[key] = points[-1][1]
        if direction != "last":
            best = (max if direction == "max" else min)(points, key=lambda p: p[1])
            row.update({f"best_{key}": best[1], f"best_step_{key}": best[0]})
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
