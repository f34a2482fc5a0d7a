"""Consistency between base and instruction-tuned models (BOSE): does a better base model give a better
instruct model? Kendall's tau-b between the base models' scores under each prompt style and the scores of
their instruction-tuned counterparts under plain zero-shot prompting, per task."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from workbench.checkpoints import newest_complete_checkpoint
from workbench.errors import ConfigError
from workbench.io import atomic_write_text
from workbench_eval.config import EvalConfig
from workbench_eval.report import latest_by_cell
from workbench_eval.results import metric_info, read_results
from workbench_eval.stability import consistency, paired_tau_difference
from workbench_eval.sweep import Target, run_target, sweep

INSTRUCT_STYLE = "zero_shot"


def model_lists(base: list[Path], instruct: list[Path]) -> tuple[list[Path], list[Path]]:
    """The base and instruct run lists: given directly, or as one YAML file `{base: [...], instruct: [...]}`."""
    if len(base) == 1 and base[0].suffix in (".yaml", ".yml") and not instruct:
        from workbench.yaml_text import parse_yaml

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


def consistency_rows(base: list[dict], instruct: list[dict], n_boot: int,
                     metrics: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per (task, base style, metric): Kendall's tau-b between the base models' scores in that style and the
    instruct models' zero-shot scores, its 95% interval over resampled models, and its paired bootstrap
    difference from the zero-shot style's tau (the same models drawn for both, `paired_tau_difference`).

    `base[m]`, `instruct[m]`: model m's (task, style, metric) -> score. `metrics`: task -> the metric to rank
    by (default: every primary metric the results hold). Styles are those every base model has; a row whose
    scores are constant has tau undefined (nan) and a note."""
    keys = set.intersection(*(set(b) for b in base))
    pairs = list(metrics.items()) if metrics is not None else sorted(
        {(t, m) for t, _, m in keys if metric_info(m).primary})
    rows = []
    for task, metric in pairs:
        if not all((task, INSTRUCT_STYLE, metric) in i for i in instruct):
            continue
        z = [i[(task, INSTRUCT_STYLE, metric)] for i in instruct]
        reference = [b[(task, INSTRUCT_STYLE, metric)] for b in base] if (task, INSTRUCT_STYLE, metric) in keys else None
        for style in sorted({s for t, s, m in keys if t == task and m == metric}):
            x = [b[(task, style, metric)] for b in base]
            row = {"task": task, "style": style, "metric": metric, "base": x, "instruct": z}
            if len(set(x)) < 2 or len(set(z)) < 2:
                rows.append({**row, "tau": math.nan, "p": math.nan, "ci": (math.nan, math.nan),
                             "delta": None, "note": "constant scores: tau undefined"})
                continue
            single = consistency(x, z, n_boot=n_boot)
            delta = None if style == INSTRUCT_STYLE or reference is None or len(set(reference)) < 2 else (
                paired_tau_difference(x, reference, z, n_boot=n_boot))
            rows.append({**row, "tau": single.tau, "p": single.p_value, "ci": (single.ci_low, single.ci_high),
                         "delta": None if delta is None else (delta.difference, delta.ci_low, delta.ci_high)})
    return rows


def consistency_table(rows: list[dict[str, Any]]) -> list[str]:
    """`consistency_rows` as a Markdown table."""
    def f(x: float, sign: str = "") -> str:
        return "–" if x is None or math.isnan(x) else f"{x:{sign}.2f}"

    lines = ["| task | base style | metric | tau (base vs instruct) | p | 95% CI (resampling models) | "
             "tau − tau(zero-shot), paired bootstrap [95% CI] | base scores (range) |",
             "|---|---|---|---:|---:|---|---|---|"]
    for r in rows:
        if r["delta"] is None:
            delta = "(reference)" if r["style"] == INSTRUCT_STYLE else "–"
        else:
            d, lo, hi = r["delta"]  # an interval over resampled models, not seeds
            delta = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (", inside the spread" if lo <= 0 <= hi else "")
        lines.append(f"| {r['task']} | {r['style']} | {r['metric']} | {f(r['tau'], '+')} | {f(r['p'])} | "
                     f"[{f(r['ci'][0], '+')}, {f(r['ci'][1], '+')}] | {delta} | "
                     f"{min(r['base']):.3f}–{max(r['base']):.3f} |")
    return lines


def evaluate_consistency(base_runs: list[Path], instruct_runs: list[Path], cfg: EvalConfig,
                         out_dir: Path, limit: int | None = None, n_boot: int = 1000) -> list[dict[str, Any]]:
    """Evaluate the final checkpoints (cached per run; base runs in every style of `cfg`, instruct runs
    zero-shot) and write `consistency_rows` to out_dir/consistency.md and .json."""
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
    rows = consistency_rows([final_scores(t) for t in base_targets], [final_scores(t) for t in instruct_targets],
                            n_boot)
    lines = ["# Consistency: base ranking under each style vs instruct ranking (zero-shot)", "",
             "Base runs: " + ", ".join(f"`{r}`" for r in base_runs),
             "Instruct runs: " + ", ".join(f"`{r}`" for r in instruct_runs), "", *consistency_table(rows)]
    atomic_write_text(out_dir / "consistency.md", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "consistency.json", json.dumps(rows, indent=1))
    return rows
