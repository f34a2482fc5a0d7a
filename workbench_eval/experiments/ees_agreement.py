"""How closely EES tracks the exact EigenScore on real sampled answers: Pearson and Spearman correlation and the
error over every (run, checkpoint, prompt) item that the evaluator's `eigenscore` task scored.

    python workbench_eval/experiments/ees_agreement.py runs/send            # every run folder under a study folder
    python workbench_eval/experiments/ees_agreement.py runs/a runs/b --style question

Reads `<run>/eval/results.jsonl` (the `ees` and `eigenscore` lines of one cell carry their per-prompt items in the
same order); prints n, r, ρ, the mean and largest absolute difference in nats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from workbench.layout import RUN_CONFIG, results_path
from workbench.metrics.eigenscore import PROBES
from workbench.metrics.hallucination import EigenScoreConfig
from workbench.stats import pearson_r, spearman_rho
from workbench_eval.results import read_results


def paired_items(run_dirs: list[Path], style: str) -> tuple[list[float], list[float]]:
    """(EES, exact) per scored prompt, across the runs' checkpoints."""
    ees: list[float] = []
    exact: list[float] = []
    for run in run_dirs:
        cells: dict[str, dict[str, list[float]]] = {}
        for record in read_results(results_path(run)):
            if record.get("task") == "eigenscore" and record.get("style") == style:
                cells.setdefault(record["checkpoint"], {})[record["metric"]] = record["items"]
        for cell in cells.values():
            if "ees" in cell and "eigenscore" in cell and len(cell["ees"]) == len(cell["eigenscore"]):
                ees += cell["ees"]
                exact += cell["eigenscore"]
    return ees, exact


def trace_estimators(run_dirs: list[Path]) -> dict[tuple[int, int], int]:
    """(K samples, N_z probes) of the runs' `eigenscore` style (their config.yaml's eval section, else the
    defaults) -> how many runs: with N_z >= K the trace is exact and the check cannot fail on the trace."""
    counts: dict[tuple[int, int], int] = {}
    for run in run_dirs:
        config = yaml.safe_load((run / RUN_CONFIG).read_text()) or {} if (run / RUN_CONFIG).is_file() else {}
        options = ((config.get("eval") or {}).get("style_options") or {}).get("eigenscore") or {}
        key = (int(options.get("samples") or EigenScoreConfig().samples), int(options.get("probes") or PROBES))
        counts[key] = counts.get(key, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or study folders holding them")
    parser.add_argument("--style", default="completion")
    args = parser.parse_args(argv)
    runs = [f for folder in args.folders for f in ([folder] if (folder / RUN_CONFIG).is_file()
                                                   else sorted(p for p in folder.iterdir() if p.is_dir()))]
    runs = [run for run in runs if paired_items([run], args.style)[0]]  # the runs scored with both
    ees, exact = paired_items(runs, args.style)
    if len(ees) < 3:
        print("fewer than 3 scored prompts with both EES and the exact EigenScore", file=sys.stderr)
        return 1
    differences = [abs(a - b) for a, b in zip(ees, exact, strict=True)]
    print(f"n = {len(ees)} prompts (all checkpoints of {len(runs)} runs), style {args.style}")
    for (samples, probes), count in trace_estimators(runs).items():
        how = "exact (probes >= K)" if probes >= samples else "estimated by Hutchinson's probes"
        print(f"{count} runs at K = {samples} samples, {probes} probes: the trace is {how}")
    print(f"Pearson r = {pearson_r(ees, exact):.6f}, Spearman rho = {spearman_rho(ees, exact):.6f}")
    print(f"|EES - EigenScore|: mean {sum(differences) / len(differences):.2e} nats, max {max(differences):.2e} nats; "
          f"EigenScore range {min(exact):.3f} .. {max(exact):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
