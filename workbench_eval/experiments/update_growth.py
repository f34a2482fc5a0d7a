"""Early growth of the LoRA update, per arm of a study: mean ± std over seeds of a logged metric at given steps.

    python workbench_eval/experiments/update_growth.py runs/allora --metric lora_delta_norm --steps 19 57 114

Reads each run's `config.yaml` (for its axis values: the folder name `axis=value_..._seed=N`) and
`metrics.jsonl`; prints a Markdown table, one row per combination of axis values, one column per step.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from workbench.io import read_jsonl
from workbench.layout import METRICS
from workbench.stats import mean_sd

RUN = re.compile(r"^(?P<values>.+)_seed=(?P<seed>\d+)$")  # a study run's folder name (`workbench.study.plan.grid`)


def value_at(metrics: Path, key: str, step: int) -> float | None:
    """The first value of `key` logged at `step` in a run's metrics.jsonl; None when it was not logged there."""
    for record in read_jsonl(metrics):
        if record.get("step") == step and isinstance(record.get(key), (int, float)):
            return float(record[key])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="a study folder, e.g. runs/allora")
    parser.add_argument("--metric", default="lora_delta_norm")
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    args = parser.parse_args(argv)
    groups: dict[str, dict[int, list[float]]] = {}
    for run in sorted(p for p in args.study.iterdir() if (p / METRICS).is_file()):
        match = RUN.match(run.name)
        if match is None:
            continue
        for step in args.steps:
            value = value_at(run / METRICS, args.metric, step)
            if value is not None:
                groups.setdefault(match["values"], {}).setdefault(step, []).append(value)
    if not groups:
        raise SystemExit(f"error: no run in '{args.study}' logged '{args.metric}' at steps {args.steps}")
    print("| run | " + " | ".join(f"{args.metric} at step {s}" for s in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for name, by_step in groups.items():
        cells = []
        for step in args.steps:
            values = mean_sd(by_step.get(step, []))
            cells.append(f"{values.text(3, sign=False)} (n={values.n})" if values.n else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
