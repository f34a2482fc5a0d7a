"""A study's claims (`claims:` in the study YAML): each a paper's claim tested by one paired comparison over
seeds, with the paper's effect carried to our metric, the minimum detectable effect and a verdict computed by a
fixed rule (`workbench.stats.verdict`: reproduces / opposite / no effect at this scale / underpowered).

    claims:
      - name: faster-growth
        claim: ALLoRA's update grows ||BA|| faster early in training than LoRA's
        axis: adapter                      # the axis whose values are the arms
        arm: allora-update
        reference: lora
        metric: first_lora_delta_norm      # a column of the table (a collected key, best@..., test@...)
        where: {methods.allora.eta: 2}     # other axes fixed to one value each
        at_best: {axis: training.learning_rate, by: eval_loss, best: min}   # each arm at its best rate
        paper: {value: 0.25, unit: relative change, source: Table 2, carry: relative}
        primary: true                      # one per claim family; the rest are exploratory (Holm-adjusted)

Per seed the difference arm - reference is taken on the runs the claim selects; over seeds: mean, 95%
Student-t interval, standard deviation s_d, paired-t p-value and MDE = (t(0.975, n-1) + t(0.80, n-1)) s_d / sqrt(n).
The paper's effect is `value` in our metric's units (`carry: absolute`) or `value` times the reference arm's mean
(`carry: relative`, a relative change carried as the same relative change; of column `relative_to` where the
metric is itself a difference, e.g. an oscillation minus its noise floor). With `at_best`, each arm is read at
the value of `at_best.axis` whose mean `by` over seeds is best, and a best value at either end of a grid of at
least two values fails the study's report (the grid does not bracket the optimum). The exploratory claims'
p-values are Holm-adjusted across the study's exploratory claims.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from workbench.stats import VERDICTS, holm, paired_test, verdict

__all__ = ["VERDICTS", "AtBest", "ClaimSpec", "PaperEffect", "claims_markdown", "evaluate_claims"]


class PaperEffect(BaseModel):
    """The paper's effect: `value` (signed, the direction the paper reports) in `unit`, read from `source`
    (a table or figure), carried to our metric by `carry`; `note` says how the number was read."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(description="nonzero: a claim has a direction")
    unit: str
    source: str
    carry: Literal["absolute", "relative"]
    relative_to: str | None = None  # `carry: relative`: the column whose reference mean it scales (default: metric)
    note: str = ""

    @pydantic.field_validator("value")
    @classmethod
    def _directed(cls, value: float) -> float:
        if value == 0:
            raise ValueError("the paper's effect is 0: a claim needs a direction (put a check without one in `compare`)")
        return value

    def on_our_scale(self, reference_mean: float) -> float:
        """The effect in our metric's units: `value`, or `value` times the reference arm's mean."""
        return self.value if self.carry == "absolute" else self.value * abs(reference_mean)


class AtBest(BaseModel):
    """Read each arm at its own best value of `axis` (mean of column `by` over seeds, lowest or highest)."""

    model_config = ConfigDict(extra="forbid")
    axis: str
    by: str
    best: Literal["min", "max"] = "min"


class ClaimSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    claim: str
    axis: str
    arm: Any
    reference: Any
    metric: str
    where: dict[str, Any] = Field(default_factory=dict)
    at_best: AtBest | None = None
    paper: PaperEffect
    primary: bool = True


def _label(value: Any) -> str:
    return str(value)


def _numeric_order(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _best_value(rows: list[dict[str, Any]], spec: AtBest, grid: list[str]) -> tuple[str | None, bool]:
    """The value of `spec.axis` whose mean `spec.by` over `rows` is best, and whether it is at an end of the
    grid (a grid of at least two values)."""
    means = {}
    for value in grid:
        scores = [r[spec.by] for r in rows if _label(r.get(spec.axis)) == value and _finite(r.get(spec.by))]
        if scores:
            means[value] = statistics.fmean(scores)
    if not means:
        return None, False
    pick = min if spec.best == "min" else max
    best = pick(means, key=means.__getitem__)
    ordered = _numeric_order(grid)
    return best, len(ordered) >= 2 and best in (ordered[0], ordered[-1])


def evaluate_claims(claims: list[ClaimSpec], rows: list[dict[str, Any]], grids: dict[str, list[str]]
                    ) -> list[dict[str, Any]]:
    """Each claim's paired test and verdict from the runs' rows (`grids`: every axis's values, as labels)."""
    results = []
    for spec in claims:
        selected = [r for r in rows if all(_label(r.get(k)) == _label(v) for k, v in spec.where.items())]
        sides, checks, chosen = {}, [], {}
        for side, value in (("arm", spec.arm), ("reference", spec.reference)):
            members = [r for r in selected if _label(r.get(spec.axis)) == _label(value)]
            if spec.at_best is not None:
                best, at_edge = _best_value(members, spec.at_best, grids.get(spec.at_best.axis, []))
                chosen[side] = best
                if at_edge:
                    checks.append(f"{value}: best {spec.at_best.axis} {best} is at the edge of its grid "
                                  f"({', '.join(_numeric_order(grids[spec.at_best.axis]))}): not bracketed")
                members = [r for r in members if _label(r.get(spec.at_best.axis)) == best]
            sides[side] = {r["seed"]: r.get(spec.metric) for r in members}
            if side == "reference":
                reference_rows = members
        seeds = sorted(s for s in sides["arm"] if s in sides["reference"]
                       and _finite(sides["arm"][s]) and _finite(sides["reference"][s]))
        test = paired_test([sides["arm"][s] - sides["reference"][s] for s in seeds])
        scale = spec.paper.relative_to or spec.metric
        reference_values = [r[scale] for r in reference_rows if r["seed"] in seeds and _finite(r.get(scale))]
        reference_mean = statistics.fmean(reference_values) if reference_values else math.nan
        arm_mean = statistics.fmean(sides["arm"][s] for s in seeds) if seeds else math.nan
        expected = spec.paper.on_our_scale(reference_mean) if math.isfinite(reference_mean) else math.nan
        results.append({
            "name": spec.name, "claim": spec.claim, "primary": spec.primary, "metric": spec.metric,
            "arm": _label(spec.arm), "reference": _label(spec.reference), "where": spec.where,
            "at_best": chosen or None, "seeds": seeds, "arm_mean": arm_mean, "reference_mean": reference_mean,
            "difference": test.mean, "ci95": [test.low, test.high], "sd": test.sd, "n": test.n,
            "p_value": test.p_value, "mde": test.mde, "paper": spec.paper.model_dump(),
            "paper_effect_here": expected, "verdict": verdict(test, expected) if math.isfinite(expected) else VERDICTS[3],
            "checks": checks})
    exploratory = [r for r in results if not r["primary"]]
    for result, adjusted in zip(exploratory, holm([r["p_value"] for r in exploratory]), strict=True):
        result["p_holm"] = adjusted
    return results


def _number(value: float) -> str:
    return f"{value:+.4g}" if _finite(value) else "–"


def claims_markdown(results: list[dict[str, Any]]) -> list[str]:
    """The claims as report lines: one row each, then the failed checks (a grid that does not bracket)."""
    if not results:
        return []
    lines = ["## Claims", "",
             "Each claim's paired difference arm - reference over seeds (same seed: same base model, data and "
             "controls), its 95% Student-t interval, the minimum detectable effect (MDE, 80% power, from the "
             "observed s.d. of the differences) and the paper's effect carried to this metric; the verdict follows "
             "the fixed rule: *reproduces* (interval excludes 0 in the paper's direction), *opposite*, *no effect "
             "at this scale* (holds 0 and MDE <= |paper's effect|), *underpowered*. Exploratory rows (not the "
             "claim's primary comparison) give Holm-adjusted p-values across the exploratory rows.", "",
             "| claim | arm vs reference | metric | difference [95% CI] | n | MDE | paper's effect (here) | source "
             "| p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        low, high = r["ci95"]
        where = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in r["where"].items())
        best = "; ".join(f"{side} at {v}" for side, v in (r["at_best"] or {}).items())
        cell = f"{r['arm']} vs {r['reference']}" + (f" ({where})" if where else "") + (f" ({best})" if best else "")
        paper = r["paper"]
        effect = f"{paper['value']:+g} {paper['unit']} ({_number(r['paper_effect_here'])})"
        p = f"{r['p_value']:.3g}" if _finite(r["p_value"]) else "–"
        if not r["primary"]:
            p += f" (Holm {r['p_holm']:.3g})" if _finite(r.get("p_holm")) else ""
        kind = "" if r["primary"] else " (exploratory)"
        lines.append(f"| {r['name']}: {r['claim']}{kind} | {cell} | `{r['metric']}` | {_number(r['difference'])} "
                     f"[{_number(low)}, {_number(high)}] | {r['n']} | {_number(r['mde']).lstrip('+')} | {effect} "
                     f"| {paper['source']} | {p} | **{r['verdict']}** |")
    failed = [check for r in results for check in r["checks"]]
    if failed:
        lines += ["", "**Report check failed**: " + "; ".join(failed) + "."]
    return lines
