"""Running a study's runs: each through `launch/train.py --resume` (a one-process run forked from a warm server,
`workbench.processes`), its status in `study_status.json`.

A finished run is skipped, a killed one resumes from its checkpoint, a failed one is recorded with its error
line and the others go on. In a two-stage study the pretrain run (or with `pretrain.per`, the pretrain runs,
one per value of that axis) trains first; if one fails, no arm is started. `in_parallel` is how runs (and the
reproductions' evaluation sweeps, `workbench_eval.sweep.sweep_all`) go several at a time with the cores shared out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from workbench.config import resolve_path
from workbench.distributed_launch import free_port
from workbench.errors import WorkbenchError
from workbench.io import atomic_write_text, read_jsonl
from workbench.layout import METRICS
from workbench.processes import allocator_env, train_process
from workbench.study.plan import RunSpec, StudyConfig, pretrain_for
from workbench.study.submitit import submit

STATUS = "study_status.json"


def run_status(run: RunSpec) -> dict[str, Any]:
    """The run's recorded status (`pending` before it ran). A run launched by hand has no status file: it is
    `done` when its metrics.jsonl has the Trainer's end-of-training record (`train_runtime`), else `unfinished`."""
    path = run.run_dir / STATUS
    if path.is_file():
        return yaml.safe_load(path.read_text())
    if run.stage == "hand":
        metrics = run.run_dir / METRICS
        done = metrics.is_file() and any("train_runtime" in r for r in read_jsonl(metrics))
        return {"status": "done" if done else "unfinished"}
    return {"status": "pending"}


def train_arguments(run: RunSpec) -> list[str]:
    """`launch/train.py`'s arguments for one run: its config, its `--set` overrides and `--resume`."""
    return [str(resolve_path(run.config)), *[arg for o in run.overrides() for arg in ("--set", o)], "--resume"]


def train_command(study: StudyConfig, run: RunSpec, port: int = 29500) -> list[str]:
    """The `launch/train.py` command line of one run, under the study's launcher, with `--resume`: the train
    command's module (`workbench_cli.train`), run in the current directory as `python -m` runs it."""
    module = ["--module", "workbench_cli.train"]  # by name: the library does not import the command layer
    if study.launcher.kind == "deepspeed":
        launcher = str(Path(sys.executable).parent / "deepspeed")
        head = [launcher, "--num_gpus", str(study.launcher.num_gpus), "--master_port", str(port), *module]
    else:
        head = [sys.executable, "-m", module[1]]
    return head + train_arguments(run)


def execute(study: StudyConfig, run: RunSpec, threads: int | None = None, port: int | None = None) -> dict[str, Any]:
    """Train one run (resuming it if it was killed); record done or failed with the error; never raise.
    A multi-rank run meets at `port`, by default one that is free when it starts (so runs in parallel, and
    other jobs on the machine, never collide)."""
    status = run_status(run)
    if status["status"] == "done":
        return {**status, "skipped": True}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = run.run_dir / "train.log"
    start = time.time()
    if study.launcher.kind == "deepspeed":
        env = {**os.environ, **allocator_env(), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        with log.open("a") as handle:
            returncode = subprocess.run(train_command(study, run, port or free_port()), env=env,
                                        stdout=handle, stderr=subprocess.STDOUT).returncode  # in this directory
    else:  # one process: forked from a warm server (workbench.processes), not a new interpreter
        returncode = train_process(train_arguments(run), log, threads)
    status = {"status": "done" if returncode == 0 else "failed",
              "seconds": round(time.time() - start, 1), "returncode": returncode}
    if returncode != 0:
        lines = log.read_text().splitlines() if log.is_file() else []
        errors = [line for line in lines if line.startswith("error:")]
        status["error"] = errors[-1] if errors else (lines[-1] if lines else f"exit code {returncode}, no output")
    atomic_write_text(run.run_dir / STATUS, yaml.safe_dump(status))
    return status


def run_all(study: StudyConfig, runs: list[RunSpec], parallel: int = 1, executor: str = "local",
            partition: str | None = None, progress: Callable[[str], None] = print) -> bool:
    """Train `runs` (the study's plan, or part of it): the pretrain runs first, then the arms, `parallel`
    at a time (`local`) or as a submitit job array (`slurm`, `submitit-local`).

    Returns False when a pretrain run failed (after all of them ran), and then starts no arm. Raises a
    WorkbenchError when an arm is asked for without the pretrain run it starts from being done or among `runs`."""
    repeats = [r for r in runs if r.same_as is not None]  # trained as the arm they repeat (`same_as`)
    arms = [r for r in runs if r.stage == "arm" and r.same_as is None]
    first = [r for r in runs if r.stage == "pretrain"]
    for arm in arms:
        pretrain = pretrain_for(study, arm.values, arm.seed)
        if pretrain is not None and pretrain not in first and run_status(pretrain)["status"] != "done":
            raise WorkbenchError(f"arm '{arm.name}' starts from the pretrain run '{pretrain.run_dir}', which is "
                                 f"{run_status(pretrain)['status']}: train it first (--only {pretrain.name})")
    started = time.time()
    done = 0
    for batch in (first, arms):
        if not batch:
            continue
        complete = True
        for run, status in zip(batch, _statuses(study, batch, parallel, executor, partition), strict=True):
            done += 1
            took = "finished earlier, skipped" if status.get("skipped") else f"{status.get('seconds', 0):.0f} s"
            progress(f"[{done}/{len(runs)}] {run.name}: {status['status']} ({took}, "
                     f"{time.time() - started:.0f} s so far)")
            complete = complete and (run.stage != "pretrain" or status["status"] == "done")
        if not complete:
            return False
    for run in repeats:
        done += 1
        progress(f"[{done}/{len(runs)}] {run.name}: the same training as {run.same_as}, "
                 f"{run_status(run)['status']} (not trained again)")
    return True


def run_all_or_raise(study: StudyConfig, runs: list[RunSpec], parallel: int = 1,
                     progress: Callable[[str], None] = print) -> None:
    """`run_all`, for a script that cannot go on without every run trained (the reproductions,
    `workbench_eval/experiments/`): afterwards a RuntimeError naming each run of `runs` that is not done, with its
    error line and the tail of its `train.log`."""
    run_all(study, runs, parallel, progress=progress)
    failed = [(run, run_status(run)) for run in runs if run_status(run)["status"] != "done"]
    if failed:
        lines = []
        for run, status in failed:
            log = run.run_dir / "train.log"
            tail = log.read_text().splitlines()[-15:] if log.is_file() else []
            lines += [f"{run.name}: {status.get('error', status['status'])} (see {log})", *tail]
        raise RuntimeError(f"study {study.study}: {len(failed)} of {len(runs)} runs did not finish:\n" + "\n".join(lines))


def _statuses(study: StudyConfig, runs: list[RunSpec], parallel: int, executor: str,
              partition: str | None) -> Iterator[dict[str, Any]]:
    """Each run's status, in order, as soon as it and the runs before it are finished."""
    if executor != "local":
        yield from submit(study, runs, execute, executor, partition)
        return
    yield from in_parallel(lambda run, threads: execute(study, run, threads), runs, parallel)


def in_parallel(function: Callable[[Any, int], Any], items: list[Any], parallel: int = 1) -> Iterator[Any]:
    """`function(item, threads)` for each of `items`, `parallel` at a time (threads of this process, each starting
    its own process: a run, an evaluation), the machine's cores shared out (`threads` = cores // parallel, at
    least 1); the results in order, each as soon as it and those before it are done (an exception is raised
    when its item's turn comes)."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(function, item, threads) for item in items]
        for future in futures:
            yield future.result()
