"""Run a study: a grid of training runs from one base config, resumably, then one table and report.

    python launch/study.py configs/studies/example.yaml              # every run, one after another
    python launch/study.py configs/studies/repetition-*.yaml --quick # several studies, their quick grids
    python launch/study.py configs/studies/example.yaml --dry-run    # print the grid, one run a line
    python launch/study.py configs/studies/example.yaml --parallel 2 # two runs at a time, cores shared
    python launch/study.py configs/studies/example.yaml --only NAME  # exactly one run (for any scheduler)
    python launch/study.py configs/studies/example.yaml --executor slurm --partition gpu  # a Slurm job array

Finished runs are skipped; a killed run resumes from its checkpoint; a failed run is recorded with its error
and the study goes on. Results: <runs_dir>/<study>/runs.csv, results.csv (mean, std, n over seeds), report.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from workbench.errors import WorkbenchError
from workbench.study import execute, grid, load_study, run_status
from workbench.study_report import write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="study", help="study YAML(s), run one after another")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="profile",
                      help="the study's smaller `quick` grid (for CI; runs go to <study>-quick)")
    size.add_argument("--scale", action="store_const", const="scale", dest="profile",
                      help="the study's larger `scale` grid (for a GPU or a cluster; runs go to <study>-scale)")
    size.add_argument("--profile", help="any profile the study YAML defines")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    parser.add_argument("--only", help="run exactly this run (its name from --dry-run)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each with its share of the cores")
    parser.add_argument("--executor", choices=["local", "submitit-local", "slurm"], default="local")
    parser.add_argument("--partition", help="Slurm partition (with --executor slurm)")
    args = parser.parse_args(argv)
    try:
        studies = [load_study(path, args.profile) for path in args.studies]
        if args.only and len(studies) > 1:
            raise WorkbenchError("--only takes one study file")
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    for study in studies:
        code = run_study(study, args)
        if code:
            return code
    return 0


def run_study(study, args: argparse.Namespace) -> int:
    runs = grid(study)
    if args.only:
        runs = [r for r in runs if r.name == args.only]
        if not runs:
            print(f"error: no run named '{args.only}' in study '{study.study}' (see --dry-run)", file=sys.stderr)
            return 2
    if args.dry_run:
        for run in runs:
            print(f"{run.name}\t{run_status(run)['status']}\t{run.run_dir}")
        return 0
    started = time.time()
    print(f"study {study.study}: {len(runs)} runs" + (f" (profile {study.profile})" if study.profile else ""))
    if args.executor == "local":
        threads = max(1, (os.cpu_count() or 1) // args.parallel)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(execute, study, run, threads, 29500 + i) for i, run in enumerate(runs)]
            for i, (run, future) in enumerate(zip(runs, futures, strict=True), 1):
                status = future.result()
                took = "finished earlier, skipped" if status.get("skipped") else f"{status.get('seconds', 0):.0f} s"
                print(f"[{i}/{len(runs)}] {run.name}: {status['status']} ({took}, {time.time() - started:.0f} s so far)",
                      flush=True)
    else:
        from workbench.study_submitit import submit

        submit(study, runs, args.executor, args.partition)
    results, report = write_results(study, grid(study))
    print(f"study {study.study}: {time.time() - started:.0f} s; results {results}; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
