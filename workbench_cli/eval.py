"""Evaluate checkpoints with the BOSE evaluator.

    python launch/eval.py --list                                # BOSE tasks, their kinds and prompt styles
    python launch/eval.py runs/quickstart                       # every checkpoint of a run
    python launch/eval.py runs/quickstart --task factworld_mc:blank_ppl,letter --limit 100
    python launch/eval.py runs/a runs/b --out evals_out         # evals_out/a/, evals_out/b/
    python launch/eval.py --model path/or/hub-name --out evals_out --task arc_easy_bose
    python launch/eval.py runs/smoe --experts 1,2,4,8,16          # an SMoE run at each inference k (or `all`)
    python launch/eval.py runs/lora --dtype bfloat16            # in bf16 (default: as saved on a GPU, fp32 on CPU)
    python launch/eval.py --consistency runs/b1 runs/b2 runs/b3 --instruct runs/i1 runs/i2 runs/i3 --out out/
    python launch/eval.py --consistency models.yaml --out out/  # models.yaml: {base: [runs...], instruct: [runs...]}
    workbench eval runs/quickstart                              # the installed command, in any directory

Results: <run>/eval/results.jsonl (one line per checkpoint, task, style and metric; with --experts the style is
<style>@k<K> and the line has a field `experts`), report.md, <task>.png;
with --out DIR they go to DIR instead (DIR/<run name>/ when several runs are given).
A re-run evaluates only the cells that are missing from the results it writes to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from workbench.errors import ConfigError, WorkbenchError
from workbench_eval.config import EvalConfig, EvalDtype, EvalTask, load_eval_config


def _tasks(specs: list[str]) -> list[EvalTask]:
    """`task` or `task:style,style` -> EvalTask."""
    tasks = []
    for spec in specs:
        name, _, styles = spec.partition(":")
        tasks.append(EvalTask(task=name, styles=styles.split(",") if styles else None))
    return tasks


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--config", help="a YAML with an `eval:` section (default: the run's own, else defaults)")
    parser.add_argument("--task", action="append", default=[], metavar="TASK[:STYLE,...]", help="repeatable")
    parser.add_argument("--limit", type=int, help="items per task")
    parser.add_argument("--model", help="evaluate one model (hub name or local folder) instead of runs")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/eval/; with several runs, "
                        "OUT/<run name>/)")
    parser.add_argument("--experts", metavar="K[,K...]|all", help="SMoE checkpoints: evaluate each cell at each "
                        "number of active experts per token (`all`: 1, 2, 4, ..., E), recorded as style <style>@k<K>")
    parser.add_argument("--dtype", choices=get_args(EvalDtype), help="dtype to evaluate checkpoints in (eval.dtype; "
                        "default auto: as saved on a GPU, float32 on CPU; adapters stay unmerged in 16 bits)")
    parser.add_argument("--step", type=int, help="evaluate only checkpoint-STEP of each run")
    parser.add_argument("--base", action="store_true", help="evaluate the model each run started from (its "
                        "model.name_or_path: a run's newest checkpoint, or a model folder) on the run's tasks and data")
    parser.add_argument("--list", action="store_true", help="list the BOSE tasks and their prompt styles, then exit")
    parser.add_argument("--consistency", nargs="+", type=Path, metavar="BASE_RUN", help="base runs, ranked")
    parser.add_argument("--instruct", nargs="+", type=Path, metavar="INSTRUCT_RUN", help="their instruct runs")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def _experts(spec: str) -> list[int] | str:
    """`--experts 1,2,4` or `all`."""
    if spec.strip() == "all":
        return "all"
    try:
        counts = [int(k) for k in spec.split(",") if k.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--experts: give numbers of experts >= 1 separated by commas (e.g. 1,2,4) or `all`, "
                          f"got '{spec}'")
    return sorted(set(counts))


def _config(args, own: EvalConfig | None) -> EvalConfig:
    cfg = load_eval_config(args.config) if args.config else (own or EvalConfig())
    cfg = cfg.model_copy(update={"tasks": _tasks(args.task)}) if args.task else cfg
    cfg = cfg.model_copy(update={"dtype": args.dtype}) if args.dtype else cfg
    return cfg.model_copy(update={"experts": _experts(args.experts)}) if args.experts else cfg


def list_tasks(include_path: list[str]) -> str:
    """The BOSE task specs (workbench_eval/tasks/ and `include_path`) with their kind, data and valid prompt styles."""
    from workbench_eval.specs import TASKS_DIR, available_specs, load_spec
    from workbench_eval.styles import valid_styles

    rows = []
    for name in sorted(available_specs(tuple(include_path))):
        spec = load_spec(name, tuple(include_path))
        data = f"stock {spec.stock}" if spec.stock else f"generator {(spec.dataset or {}).get('generator')}"
        rows.append((name, spec.kind, spec.tag or "", data, ", ".join(valid_styles(spec))))
    header = ("task", "kind", "tag", "data", "styles")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [f"BOSE tasks ({TASKS_DIR.relative_to(TASKS_DIR.parent.parent)}/"
             f"{''.join(', ' + p for p in include_path)}); select with --task TASK or --task TASK:STYLE,STYLE "
             "(a tag selects all its tasks)", ""]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
              for r in [header, *rows]]
    lines += ["", "Sampled answers: eigenscore (styles completion, question): EigenScore, EES and token entropy of",
              "K sampled answers to the fact-world test prompts (options: eval.style_options.eigenscore)."]
    lines += ["", "Stock lm-eval tasks: any name that `lm_eval --tasks list` prints, run as lm-eval defines it",
              "with style `native`, e.g. --task hellaswag:native (its data must be reachable)."]
    return "\n".join(lines)


def _run_targets(runs: list[Path], out: Path | None) -> list:
    """A target per run folder; results in OUT (one run) or OUT/<run name> (several), else <run>/eval."""
    from workbench_eval.sweep import run_target

    names = [run.resolve().name for run in runs]
    if out is not None and len(runs) > 1:
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ConfigError(f"--out: several runs are named '{clash[0]}'; their results would share "
                              f"'{out / clash[0]}' (evaluate them one at a time with their own --out)")
        return [run_target(run, out / name) for run, name in zip(runs, names, strict=True)]
    return [run_target(run, out) for run in runs]


def _run(args) -> int:
    if args.list:  # before the imports below: listing loads no model, torch or lm-eval
        include = load_eval_config(args.config).include_path if args.config else []
        print(list_tasks(list(include)))
        return 0
    from workbench_eval.report import write_report
    from workbench_eval.results import read_results
    from workbench_eval.sweep import base_target, model_target, only_step, sweep

    if args.consistency:
        from workbench_eval.consistency import evaluate_consistency, model_lists

        base, instruct = model_lists(args.consistency, args.instruct or [])
        out = args.out or Path("runs") / "consistency"
        rows = evaluate_consistency(base, instruct, _config(args, None), out, args.limit)
        print(f"{len(rows)} rows of Kendall's tau in {out / 'consistency.md'}")
        return 0
    if args.model:
        targets = [model_target(args.model, args.out or Path("runs") / "eval" / Path(args.model).name)]
    elif args.runs:
        targets = _run_targets(args.runs, args.out)
        if args.step is not None and args.base:
            raise ConfigError("--step and --base: give one (a checkpoint of the run, or the model it started from)")
        targets = [only_step(t, args.step) if args.step is not None else base_target(t, run) if args.base else t
                   for t, run in zip(targets, args.runs, strict=True)]
    else:
        raise WorkbenchError("give run folders, --model, or --consistency (see --help)")
    for target in targets:
        cfg = _config(args, target.eval_cfg)
        done = sweep(target, cfg, args.limit)
        report = write_report(read_results(target.results), target.results.parent, target.name,
                              n_boot=cfg.bootstrap, early_fraction=cfg.early_fraction)
        print(f"{target.name}: {done} new cells; results {target.results}; report {report}")
    return 0


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`main` as a program: exit with its code."""
    sys.exit(main(argv, prog))


if __name__ == "__main__":  # python -m workbench_cli.eval
    run()
