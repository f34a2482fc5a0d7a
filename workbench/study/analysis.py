"""A study's comparisons (`compare:` in the study YAML): paired deltas against a reference run, and whether
two groups of runs agree on the best value of a swept axis (e.g. does an MoE proxy pick the dense model's
dropout rate?), with the cost of each group's sweep."""

from __future__ import annotations

import math
import statistics
from typing import Any

from workbench.study.plan import AgreementSpec, DeltaSpec, StudyConfig, collected


def add_deltas(rows: list[dict[str, Any]], spec: DeltaSpec, axes: list[str]) -> None:
    """Add `<spec.name>_<key>` (`delta_<key>`) to every row (in place): its value minus the reference run's (same seed and other
    axis values, `spec.axis` = `spec.reference`), or minus the reference's `spec.against[key]` column where
    given; rows without a reference value get none."""
    others = [a for a in axes if a != spec.axis]

    def pair_key(row: dict[str, Any]) -> tuple:
        return (row["seed"], *(str(row.get(a)) for a in others))

    references = {pair_key(r): r for r in rows if str(r.get(spec.axis)) == str(spec.reference)}
    for row in rows:
        reference = references.get(pair_key(row))
        for key in spec.keys:
            other = spec.against.get(key, key)
            if reference is not None and _finite(row.get(key)) and _finite(reference.get(other)):
                row[spec.column(key)] = row[key] - reference[other]


def agreement(rows: list[dict[str, Any]], spec: AgreementSpec, maximize: bool) -> dict[str, Any]:
    """Best `x` per group and Kendall's tau-b between every two groups' y-vs-x curves.

    Curves are taken on the x values both groups have: the mean over seeds (`tau_of_means`), and seed by
    seed (`tau_per_seed`, mean and standard deviation over the seeds both groups ran). `cost` sums each
    group's collected cost keys over all its runs (the price of the whole sweep)."""
    from workbench.stats import kendall_tau_b  # SciPy: imported only when an agreement is computed
    groups = sorted({str(r.get(spec.group)) for r in rows})
    curves: dict[str, dict[int, dict[float, float]]] = {g: {} for g in groups}  # group -> seed -> x -> y
    cost: dict[str, dict[str, float]] = {g: {} for g in groups}
    for row in rows:
        group = str(row.get(spec.group))
        if _finite(row.get(spec.y)):
            curves[group].setdefault(row["seed"], {})[float(row[spec.x])] = row[spec.y]
        for key in spec.cost:
            if _finite(row.get(key)):
                cost[group][key] = cost[group].get(key, 0.0) + row[key]
    pick = max if maximize else min

    def best(curve: dict[float, float]) -> float | None:
        return pick(curve, key=curve.__getitem__) if curve else None

    means = {g: _mean_curve(curves[g]) for g in groups}
    out: dict[str, Any] = {"group": spec.group, "x": spec.x, "y": spec.y, "best": "max" if maximize else "min",
                           "groups": {}, "pairs": []}
    for group in groups:
        curve = means[group]
        out["groups"][group] = {"best_x": best(curve), "curve": curve, "cost": cost[group],
                                "best_y": curve[best(curve)] if curve else math.nan,
                                "y_range": max(curve.values()) - min(curve.values()) if curve else math.nan,
                                "best_x_per_seed": {s: best(c) for s, c in sorted(curves[group].items())}}
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            xs = sorted(set(means[a]) & set(means[b]))
            tau, p = kendall_tau_b([means[a][x] for x in xs], [means[b][x] for x in xs])
            per_seed = []
            for seed in sorted(set(curves[a]) & set(curves[b])):
                common = sorted(set(curves[a][seed]) & set(curves[b][seed]))
                t, _ = kendall_tau_b([curves[a][seed][x] for x in common], [curves[b][seed][x] for x in common])
                if math.isfinite(t):
                    per_seed.append(t)
            ratio = {k: cost[a][k] / cost[b][k] for k in cost[a] if cost[b].get(k)}
            regret = {f"{p} for {t}": _regret(curves[p], curves[t], best, maximize) for p, t in ((a, b), (b, a))}
            out["pairs"].append({"regret": regret,
                "groups": [a, b], "same_best_x": out["groups"][a]["best_x"] == out["groups"][b]["best_x"],
                "tau_of_means": tau, "p_value": p, "points": len(xs),
                "tau_per_seed_mean": statistics.fmean(per_seed) if per_seed else math.nan,
                "tau_per_seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else math.nan,
                "cost_ratio": ratio})
    return out


def _regret(proxy: dict[int, dict[float, float]], target: dict[int, dict[float, float]], best, maximize: bool
            ) -> dict[str, Any]:
    """Per seed, how much worse `target` is at the x that `proxy` picks (its best x on that seed) than at its own
    best x (0: the proxy picked target's optimum; > 0: worse, whichever the direction of y); the mean over seeds
    with its percentile bootstrap 95% interval."""
    from workbench.stats import bootstrap_mean_interval

    per_seed = {}
    for seed in sorted(set(proxy) & set(target)):
        chosen, own = best(proxy[seed]), best(target[seed])
        if chosen in target[seed]:
            gap = target[seed][own] - target[seed][chosen]
            per_seed[seed] = (gap if maximize else -gap) + 0.0  # no -0.0
    values = list(per_seed.values())
    low, high = bootstrap_mean_interval(values)
    return {"per_seed": per_seed, "mean": statistics.fmean(values) if values else math.nan,
            "ci95_bootstrap": [low, high]}


def agreement_markdown(result: dict[str, Any]) -> list[str]:
    """The agreement result as report lines."""
    lines = [f"## Agreement on the best {result['x']} ({result['best']} {result['y']}) across {result['group']}", "",
             f"| group | best x (mean over seeds) | {result['y']} there | range of the mean over x (sensitivity) "
             "| best x per seed | cost |", "|---|---|---|---|---|---|"]
    for group, entry in result["groups"].items():
        cost = ", ".join(f"{k} {v:.4g}" for k, v in entry["cost"].items())
        lines.append(f"| {group} | {entry['best_x']} | {entry.get('best_y', math.nan):.4g} | "
                     f"{entry.get('y_range', math.nan):.4g} | {list(entry['best_x_per_seed'].values())} | {cost} |")
    for pair in result["pairs"]:
        a, b = pair["groups"]
        ratio = ", ".join(f"{k} {v:.3g}x" for k, v in pair["cost_ratio"].items())
        lines += ["", f"- {a} vs {b}: same best x: **{pair['same_best_x']}**; Kendall tau of the mean curves "
                  f"{pair['tau_of_means']:.3f} (p = {pair['p_value']:.3g}, {pair['points']} points); per seed "
                  f"{pair['tau_per_seed_mean']:.3f} ± {pair['tau_per_seed_std']:.2f}; cost of {a} / {b}: {ratio}"]
        for name, entry in pair.get("regret", {}).items():
            low, high = entry["ci95_bootstrap"]
            seeds = ", ".join(f"{v:.4g}" for v in entry["per_seed"].values())
            lines.append(f"  - regret of choosing x by {name}: {entry['mean']:.4g} [{low:.4g}, {high:.4g}] (mean over "
                         f"seeds, percentile bootstrap 95% interval; per seed: {seeds}); 0 = {name.split(' for ')[1]}'s "
                         "own best, > 0 = worse")
    return lines


def compare(study: StudyConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply the study's `compare` specs: deltas go into `rows`; agreements are returned."""
    axes = list(study.axes)
    maximize = {key for key, direction in collected(study.collect).items() if direction == "max"}
    results = []
    for spec in study.compare:
        if isinstance(spec, DeltaSpec):
            add_deltas(rows, spec, axes)
        else:
            results.append(agreement(rows, spec, spec.best == "max" or (spec.best == "auto" and spec.y in maximize)))
    return results


def _mean_curve(per_seed: dict[int, dict[float, float]]) -> dict[float, float]:
    xs = sorted({x for curve in per_seed.values() for x in curve})
    return {x: statistics.fmean(c[x] for c in per_seed.values() if x in c) for x in xs}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
