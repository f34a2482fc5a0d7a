"""Run a study: a grid of training runs from one base config, resumably, then one table and report.

    python launch/study.py configs/studies/example.yaml              # every run, one after another
    python launch/study.py 'configs/studies/repetition-*.yaml' --quick  # several studies, their quick grids
    python launch/study.py configs/studies/example.yaml --dry-run    # print the plan, one run a line
    python launch/study.py configs/studies/example.yaml --parallel 2 # two runs at a time, cores (and GPUs) shared
    python launch/study.py configs/studies/example.yaml --only NAME  # exactly one run (for any scheduler)
    python launch/study.py configs/studies/example.yaml --executor slurm --partition gpu  # a Slurm job array
    python launch/study.py configs/studies/example.yaml --executor slurm --gpus-per-run 1 --mem-gb 64 --time-min 120
    python launch/study.py --collect runs/a runs/b --out runs/ab     # a table of runs launched by hand
    workbench study 'configs/studies/repetition-*.yaml' --quick      # the installed command, in any directory

A study YAML is looked up as given, then among the built-in configs (`configs/studies/...`); so is a glob
pattern that matches nothing in the current directory (or is quoted).

Finished runs are skipped; a killed run resumes from its checkpoint; a failed run is recorded with its error
and the study goes on, then exits 1 naming the failed runs (after the table and report of the others). A study
with a `pretrain` run trains it first (with `pretrain.per: <axis>`, one per value of that axis,
`pretrain_<axis>=<value>`); if one fails, no arm starts (exit 1).
Results: <runs_dir>/<study>/runs.csv, results.csv (mean, std, n over seeds), report.md.

What each run gets (GPUs, cores, memory, time, partition) is the study's `resources:` section, which the options
--gpus-per-run, --cpus-per-run, --mem-gb, --time-min and --partition override. With --parallel on a machine with
GPUs, each of the runs at a time gets its own gpus_per_run of the GPUs this process sees (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.bundled import builtin_matches
from workbench.errors import WorkbenchError
from workbench.processes import preload
from workbench.study import StudyConfig, hand_study, load_study, plan, run_all, run_status, write_results
from workbench.study.plan import PRETRAIN
from workbench.study.report import claim_checks
from workbench_eval.config import STUDY_CHECKS


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", metavar="study", help="study YAML(s), run one after another")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="profile",
                      help="the study's smaller `quick` grid (for CI; runs go to <study>-quick)")
    size.add_argument("--scale", action="store_const", const="scale", dest="profile",
                      help="the study's larger `scale` grid (for a GPU or a cluster; runs go to <study>-scale)")
    size.add_argument("--profile", help="any profile the study YAML defines")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (one run a line) and its size")
    parser.add_argument("--only", help=f"run exactly this run (its name from --dry-run; '{PRETRAIN}' or "
                                       f"'{PRETRAIN}_<axis>=<value>' for a pretrain run)")
    parser.add_argument("--parallel", type=at_least(1), default=1,
                        help="runs at a time, each with its share of the cores and its own GPUs")
    parser.add_argument("--executor", choices=["local", "submitit-local", "slurm"], default="local")
    resources = parser.add_argument_group("resources per run (override the study's `resources:` section)")
    resources.add_argument("--gpus-per-run", type=at_least(0), metavar="N",
                           help="GPUs per run (default: launcher.num_gpus under deepspeed, else 1)")
    resources.add_argument("--cpus-per-run", type=at_least(1), metavar="N", help="CPU cores per run")
    resources.add_argument("--mem-gb", type=at_least(1, float), metavar="GB", help="memory per run (Slurm)")
    resources.add_argument("--time-min", type=at_least(1), metavar="MIN", help="time limit per run (Slurm; default 240)")
    resources.add_argument("--partition", help="Slurm partition (with --executor slurm)")
    hand = parser.add_argument_group("runs launched by hand")
    hand.add_argument("--collect", nargs="+", metavar="RUN_DIR",
                      help="collect these run folders into one table, report and plots (no study YAML)")
    hand.add_argument("--out", help="with --collect: the folder for them (default: collected/ beside the runs)")
    hand.add_argument("--metric", action="append", metavar="KEY[:min|max|last]",
                      help="with --collect: a metrics.jsonl key to collect (repeatable; default eval_loss, loss)")
    args = parser.parse_args(argv)
    if args.collect is not None:
        if args.studies or args.profile or args.only or args.dry_run:
            parser.error("--collect takes run folders, not a study YAML, a profile, --only or --dry-run")
        return collect_by_hand(args)
    if not args.studies:
        parser.error("give a study YAML, or --collect RUN_DIR ...")
    if args.out or args.metric:
        parser.error("--out and --metric go with --collect")
    try:
        studies = [load_study(path, args.profile, evaluator=STUDY_CHECKS).with_resources(resource_options(args))
                   for path in study_files(args.studies)]
        if args.only and len(studies) > 1:
            raise WorkbenchError("--only takes one study file")
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    code = 0
    for study in studies:
        code = run_study(study, args) or code
        if code == 2:
            break
    return code


def at_least(lowest: float, kind: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` no smaller than `lowest`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text} is below {lowest}")
        return value

    return parse


RESOURCE_OPTIONS = ("gpus_per_run", "cpus_per_run", "mem_gb", "time_min", "partition")


def resource_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `resources` fields given on the command line (--gpus-per-run etc.)."""
    return {name: getattr(args, name) for name in RESOURCE_OPTIONS if getattr(args, name) is not None}


def study_files(paths: list[str]) -> list[str]:
    """The study YAMLs `paths` name: each as given, except a glob pattern that names no file (the shell left
    it as it was: nothing matched in the current directory, or it was quoted), which stands for the files it
    matches here, else for the built-in configs it matches (`configs/studies/repetition-*.yaml`), sorted."""
    files = []
    for path in paths:
        if Path(path).exists() or not any(c in path for c in "*?["):
            files.append(path)
            continue
        files += sorted(glob.glob(path)) or [str(p) for p in builtin_matches(path)] or [path]
    return files


def run_study(study: StudyConfig, args: argparse.Namespace) -> int:
    """Run (or with --dry-run, list) one study's plan, then write its table and report; the exit code."""
    runs = plan(study)
    if args.only:
        runs = [r for r in runs if r.name == args.only]
        if not runs:
            print(f"error: no run named '{args.only}' in study '{study.study}' (see --dry-run)", file=sys.stderr)
            return 2
        if runs[0].same_as is not None:  # its training is another arm's (the study's `same_as`)
            print(f"{args.only} is the same training as {runs[0].same_as}: running that")
            runs = [r for r in plan(study) if r.name == runs[0].same_as]
    if study.select is not None and study.select.test:  # each arm's test set is scored in a warm fork
        preload("workbench_eval.sweep", "workbench_eval.evaluator", "workbench_cli.eval")
    if args.dry_run:
        statuses = [run_status(run)["status"] for run in runs]
        for run, status in zip(runs, statuses, strict=True):
            same = f" (the same training as {run.same_as})" if run.same_as else ""
            print(f"{run.name}\t{status}{same}\t{run.run_dir}")
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
        pretrains = sum(r.stage == "pretrain" for r in runs)
        first = {0: "", 1: " (the pretrain run first, then the arms)"}.get(pretrains,
                                                                          " (the pretrain runs first, then the arms)")
        print(f"study {study.study}: {len(runs)} runs{first}: {counts or 'none'}", file=sys.stderr)
        return 0
    started = time.time()
    print(f"study {study.study}: {len(runs)} runs" + (f" (profile {study.profile})" if study.profile else ""))
    try:
        complete = run_all(study, runs, args.parallel, args.executor,
                           progress=lambda line: print(line, flush=True))
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    results, report = write_results(study, [r for r in plan(study) if r.stage == "arm"])
    print(f"study {study.study}: {time.time() - started:.0f} s; results {results}; report {report}")
    if not complete:
        for run in (r for r in runs if r.stage == "pretrain" and run_status(r)["status"] != "done"):
            which = "" if run.name == PRETRAIN else f" '{run.name}'"
            print(f"error: study {study.study}: the pretrain run{which} failed ({run_status(run).get('error')}); "
                  f"the arms were not started (see {run.run_dir / 'train.log'})", file=sys.stderr)
        return 1
    failed = [r for r in runs if run_status(r)["status"] == "failed"]
    if failed:
        print(f"error: study {study.study}: {len(failed)} of {len(runs)} runs failed: "
              + ", ".join(f"{r.name} ({r.run_dir / 'train.log'})" for r in failed), file=sys.stderr)
        return 1
    checks = claim_checks(study)
    if checks:
        print(f"error: study {study.study}: report check failed: {'; '.join(checks)} ({report})", file=sys.stderr)
        return 1
    return 0


def collect_by_hand(args: argparse.Namespace) -> int:
    """`--collect`: runs launched by hand into one table, report and plots."""
    try:
        study, runs, out = hand_study(args.collect, args.metric, args.out)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    results, report = write_results(study, runs, out)
    axes = ", ".join(study.axes) or "nothing but the seed"
    print(f"{len(runs)} runs (they differ in: {axes}); results {results}; report {report}")
    return 0


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`main` as a program: exit with its code."""
    sys.exit(main(argv, prog))


if __name__ == "__main__":  # python -m workbench_cli.study
    run()
