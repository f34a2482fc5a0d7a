"""Evaluate checkpoints with the BOSE evaluator.

    python launch/eval.py runs/quickstart                       # every checkpoint of a run
    python launch/eval.py runs/quickstart --task factworld_mc:blank_ppl,letter --limit 100
    python launch/eval.py --model path/or/hub-name --out evals_out --task arc_easy_bose
    python launch/eval.py --consistency runs/b1 runs/b2 runs/b3 --instruct runs/i1 runs/i2 runs/i3 --out out/
    python launch/eval.py --consistency models.yaml --out out/  # models.yaml: {base: [runs...], instruct: [runs...]}

Results: <run>/eval/results.jsonl (one line per checkpoint, task, style and metric), report.md, <task>.png.
A re-run evaluates only the cells that are missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.config import EvalConfig, EvalTask, load_eval_config
from workbench.errors import WorkbenchError


def _tasks(specs: list[str]) -> list[EvalTask]:
    """`task` or `task:style,style` -> EvalTask."""
    tasks = []
    for spec in specs:
        name, _, styles = spec.partition(":")
        tasks.append(EvalTask(task=name, styles=styles.split(",") if styles else None))
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--config", help="a YAML with an `eval:` section (default: the run's own, else defaults)")
    parser.add_argument("--task", action="append", default=[], metavar="TASK[:STYLE,...]", help="repeatable")
    parser.add_argument("--limit", type=int, help="items per task")
    parser.add_argument("--model", help="evaluate one model (hub name or local folder) instead of runs")
    parser.add_argument("--out", type=Path, help="output folder for --model and --consistency")
    parser.add_argument("--consistency", nargs="+", type=Path, metavar="BASE_RUN", help="base runs, ranked")
    parser.add_argument("--instruct", nargs="+", type=Path, metavar="INSTRUCT_RUN", help="their instruct runs")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _config(args, own: EvalConfig | None) -> EvalConfig:
    cfg = load_eval_config(args.config) if args.config else (own or EvalConfig())
    return cfg.model_copy(update={"tasks": _tasks(args.task)}) if args.task else cfg


def _run(args) -> int:
    from evals.report import write_report
    from evals.results import read_results
    from evals.runs import model_target, run_target, sweep

    if args.consistency:
        from evals.consistency import evaluate_consistency, model_lists

        base, instruct = model_lists(args.consistency, args.instruct or [])
        out = args.out or Path("runs") / "consistency"
        rows = evaluate_consistency(base, instruct, _config(args, None), out, args.limit)
        print(f"{len(rows)} rows of Kendall's tau in {out / 'consistency.md'}")
        return 0
    if args.model:
        targets = [model_target(args.model, args.out or Path("runs") / "eval" / Path(args.model).name)]
    elif args.runs:
        targets = [run_target(run) for run in args.runs]
    else:
        raise WorkbenchError("give run folders, --model, or --consistency (see --help)")
    for target in targets:
        cfg = _config(args, target.eval_cfg)
        done = sweep(target, cfg, args.limit)
        report = write_report(read_results(target.results), target.results.parent, target.name,
                              n_boot=cfg.bootstrap, early_fraction=cfg.early_fraction)
        print(f"{target.name}: {done} new cells; results {target.results}; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
