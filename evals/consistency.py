"""Consistency between base and instruction-tuned models (BOSE): does a better base model give a better
instruct model? Kendall's tau-b between the base models' scores under each prompt style and the scores of
their instruction-tuned counterparts under plain zero-shot prompting, per task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evals.report import latest_by_cell
from evals.results import metric_info, read_results
from evals.runs import Target, run_target, sweep
from evals.stability import consistency
from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import EvalConfig
from workbench.errors import ConfigError
from workbench.io import atomic_write_text

INSTRUCT_STYLE = "zero_shot"


def model_lists(base: list[Path], instruct: list[Path]) -> tuple[list[Path], list[Path]]:
    """The base and instruct run lists: given directly, or as one YAML file `{base: [...], instruct: [...]}`."""
    if len(base) == 1 and base[0].suffix in (".yaml", ".yml") and not instruct:
        from workbench.config import parse_yaml

        if not base[0].is_file():
            raise ConfigError(f"consistency file '{base[0]}' not found")
        data = parse_yaml(base[0].read_text()) or {}
        if not isinstance(data, dict) or set(data) != {"base", "instruct"}:
            raise ConfigError(f"{base[0]}: expected exactly the keys 'base' and 'instruct' (lists of run folders)")
        return [Path(p) for p in data["base"]], [Path(p) for p in data["instruct"]]
    return base, instruct


def final_checkpoint_target(run_dir: Path) -> Target:
    """A run restricted to its newest complete checkpoint."""
    target = run_target(run_dir)
    final = newest_complete_checkpoint(run_dir, report=lambda _: None) or target.checkpoints[-1]
    target.checkpoints = [final]
    return target


def final_scores(target: Target) -> dict[tuple[str, str, str], float]:
    """(task, style, metric) -> score of the target's one (final) checkpoint, from its results."""
    label = target.checkpoints[0].name
    return {(t, s, m): r["value"] for (t, s, m, c), r in latest_by_cell(read_results(target.results)).items()
            if c == label}


def evaluate_consistency(base_runs: list[Path], instruct_runs: list[Path], cfg: EvalConfig,
                         out_dir: Path, limit: int | None = None, n_boot: int = 1000) -> list[dict[str, Any]]:
    """Evaluate the final checkpoints (cached per run) and write consistency.md/json to `out_dir`."""
    if len(base_runs) != len(instruct_runs):
        raise ConfigError(f"--consistency got {len(base_runs)} base runs but --instruct {len(instruct_runs)}")
    if len(base_runs) < 3:
        raise ConfigError("consistency needs at least 3 base/instruct pairs to rank")
    base_targets = [final_checkpoint_target(r) for r in base_runs]
    instruct_targets = [final_checkpoint_target(r) for r in instruct_runs]
    instruct_cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"styles": [INSTRUCT_STYLE]}) for t in cfg.tasks]})
    for target in base_targets:
        sweep(target, cfg, limit)
    for target in instruct_targets:
        sweep(target, instruct_cfg, limit)
    base = [final_scores(t) for t in base_targets]
    instruct = [final_scores(t) for t in instruct_targets]
    rows = []
    for key in sorted(set.intersection(*(set(b) for b in base))):
        task, style, metric = key
        if not metric_info(metric).primary:
            continue
        z_key = (task, INSTRUCT_STYLE, metric)
        if not all(z_key in z for z in instruct):
            continue
        x, z = [b[key] for b in base], [i[z_key] for i in instruct]
        result = consistency(x, z, n_boot=n_boot)
        rows.append({"task": task, "style": style, "metric": metric, "tau": result.tau, "p_value": result.p_value,
                     "ci_low": result.ci_low, "ci_high": result.ci_high, "base": x, "instruct": z})
    _write(rows, base_runs, instruct_runs, out_dir)
    return rows


def _write(rows: list[dict[str, Any]], base_runs, instruct_runs, out_dir: Path) -> None:
    def f(x: float) -> str:
        return "–" if x is None or math.isnan(x) else f"{x:.3f}"

    lines = ["# Consistency: base ranking under each style vs instruct ranking (zero-shot)", "",
             "Base runs: " + ", ".join(f"`{r}`" for r in base_runs),
             "Instruct runs: " + ", ".join(f"`{r}`" for r in instruct_runs), "",
             "| task | base style | metric | tau | p | 95% interval (resampling models) |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {r['task']} | {r['style']} | {r['metric']} | {f(r['tau'])} | {f(r['p_value'])} | "
              f"[{f(r['ci_low'])}, {f(r['ci_high'])}] |" for r in rows]
    atomic_write_text(out_dir / "consistency.md", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "consistency.json", json.dumps(rows, indent=1))
