"""Run a study: a grid of training runs from one base config, resumably, then one table and report.

    python launch/study.py configs/studies/example.yaml              # every run, one after another
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
from concurrent.futures import ThreadPoolExecutor

from workbench.errors import WorkbenchError
from workbench.study import execute, grid, load_study, run_status
from workbench.study_report import write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="study YAML")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    parser.add_argument("--only", help="run exactly this run (its name from --dry-run)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each with its share of the cores")
    parser.add_argument("--executor", choices=["local", "submitit-local", "slurm"], default="local")
    parser.add_argument("--partition", help="Slurm partition (with --executor slurm)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        runs = grid(study)
        if args.only:
            runs = [r for r in runs if r.name == args.only]
            if not runs:
                raise WorkbenchError(f"no run named '{args.only}' in study '{study.study}' (see --dry-run)")
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.dry_run:
        for run in runs:
            print(f"{run.name}\t{run_status(run)['status']}\t{run.run_dir}")
        return 0
    if args.executor == "local":
        threads = max(1, (os.cpu_count() or 1) // args.parallel)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(execute, study, run, threads, 29500 + i) for i, run in enumerate(runs)]
            for run, future in zip(runs, futures, strict=True):
                print(f"{run.name}: {future.result()['status']}")
    else:
        from workbench.study_submitit import submit

        submit(study, runs, args.executor, args.partition)
    results, report = write_results(study, grid(study))
    print(f"results {results}; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
