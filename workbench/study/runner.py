"""Running a study's runs: each through `launch/train.py --resume` (a one-process run forked from a warm server,
`workbench.processes`), its status in `study_status.json`.

A finished run is skipped, a killed one resumes from its checkpoint, a failed one is recorded with its error
line and the others go on. In a two-stage study the pretrain run (or with `pretrain.per`, the pretrain runs,
one per value of that axis) trains first; if one fails, no arm is started. `in_slots` is how runs go several at a
time (`--parallel`), each slot with its share of the cores and its own GPUs (CUDA_VISIBLE_DEVICES, from those
this process sees, `local_slots`); `in_parallel` shares out the cores alone, for a script's own jobs (the
evaluator's `sweep_all` runs its sweeps in slots of one GPU each: `workbench_eval.sweep.evaluation_slots`).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workbench.config import resolve_path
from workbench.distributed_launch import free_port
from workbench.errors import ConfigError, WorkbenchError
from workbench.io import atomic_write_text, read_jsonl
from workbench.layout import METRICS, RUN_CONFIG, results_path
from workbench.processes import cpu_tuning_env, module_process, train_process
from workbench.study.plan import RunSpec, StudyConfig, pretrain_for
from workbench.study.selection import (
    EVAL_MODULE,
    base_dir,
    last_step,
    noise_commands,
    scoring_commands,
    scoring_done,
    selected_step,
)
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


@dataclass(frozen=True)
class Slot:
    """One of the places where runs go `--parallel` at a time: its share of the CPU threads (None: no cap) and
    the GPUs its runs see (ids as CUDA_VISIBLE_DEVICES lists them; none on a CPU machine)."""

    threads: int | None = None
    devices: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        """What a run in this slot adds to its environment: CUDA_VISIBLE_DEVICES with its GPUs."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)} if self.devices else {}


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries where it is set (ids or UUIDs), else
    0 .. torch.cuda.device_count() - 1 (none on a CPU machine)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def device_groups(gpus: list[str], parallel: int, gpus_per_run: int) -> list[tuple[str, ...]]:
    """The GPUs of each of `parallel` slots: slot i gets gpus[i * gpus_per_run : (i + 1) * gpus_per_run], so no two
    slots share one; every slot gets none on a machine without GPUs or for CPU runs (`gpus_per_run` 0).
    A ConfigError where a run asks for more GPUs than the machine has, or the slots need more than there are."""
    if not gpus or gpus_per_run == 0:
        return [()] * parallel
    if gpus_per_run > len(gpus):
        raise ConfigError(f"field 'resources.gpus_per_run': {gpus_per_run} GPUs per run, and this machine has "
                          f"{len(gpus)} ({','.join(gpus)})")
    if parallel * gpus_per_run > len(gpus):
        raise ConfigError(f"--parallel {parallel}: {parallel} runs of {gpus_per_run} GPUs need "
                          f"{parallel * gpus_per_run}, and this machine has {len(gpus)}; use --parallel "
                          f"{len(gpus) // gpus_per_run}")
    return [tuple(gpus[i * gpus_per_run:(i + 1) * gpus_per_run]) for i in range(parallel)]


def local_slots(study: StudyConfig, parallel: int) -> list[Slot]:
    """The `parallel` slots of a local study: each `resources.cpus_per_run` threads (default: the cores shared
    out, `cores // parallel`) and its own `gpus_per_run` GPUs of those this process sees (`device_groups`)."""
    threads = study.resources.cpus_per_run or cpu_share(parallel)
    groups = device_groups(visible_gpus(), parallel, study.gpus_per_run())
    return [Slot(threads, devices) for devices in groups]


def cpu_share(parallel: int) -> int:
    """Each of `parallel` slots' share of this machine's cores (at least 1)."""
    return max(1, (os.cpu_count() or 1) // parallel)


def train_command(study: StudyConfig, run: RunSpec, port: int = 29500, devices: tuple[str, ...] = ()) -> list[str]:
    """The `launch/train.py` command line of one run, under the study's launcher, with `--resume`: the train
    command's module (`workbench_cli.train`), run in the current directory as `python -m` runs it. Given the
    slot's `devices`, the deepspeed launcher takes its ranks from CUDA_VISIBLE_DEVICES (`Slot.env`), which it
    ignores when given --num_gpus."""
    module = ["--module", "workbench_cli.train"]  # by name: the library does not import the command layer
    if study.launcher.kind == "deepspeed":
        launcher = str(Path(sys.executable).parent / "deepspeed")
        ranks = [] if devices else ["--num_gpus", str(study.launcher.num_gpus)]
        head = [launcher, *ranks, "--master_port", str(port), *module]
    else:
        head = [sys.executable, "-m", module[1]]
    return head + train_arguments(run)


def execute(study: StudyConfig, run: RunSpec, slot: Slot | None = None, port: int | None = None) -> dict[str, Any]:
    """Train one run (resuming it if it was killed) in `slot` (its threads and GPUs; none: everything this process
    has); record done or failed with the error; never raise. A multi-rank run meets at `port`, by default one
    that is free when it starts (so runs in parallel, and other jobs on the machine, never collide)."""
    slot = slot or Slot()
    status = run_status(run)
    if status["status"] == "done":
        tested = score_after_training(study, run, slot)
        return {**(tested or status), "skipped": True}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = run.run_dir / "train.log"
    start = time.time()
    if study.launcher.kind == "deepspeed":
        env = {**os.environ, **cpu_tuning_env(slot.threads), **slot.env()}
        command = train_command(study, run, port or free_port(), slot.devices)
        with log.open("a") as handle:
            returncode = subprocess.run(command, env=env, stdout=handle,
                                        stderr=subprocess.STDOUT).returncode  # in this directory
    else:  # one process: forked from a warm server on CPU, a new interpreter on GPUs (workbench.processes)
        returncode = train_process(train_arguments(run), log, slot.threads, slot.env())
    status = {"status": "done" if returncode == 0 else "failed",
              "seconds": round(time.time() - start, 1), "returncode": returncode}
    if returncode != 0:
        lines = log.read_text().splitlines() if log.is_file() else []
        errors = [line for line in lines if line.startswith("error:")]
        status["error"] = errors[-1] if errors else (lines[-1] if lines else f"exit code {returncode}, no output")
    atomic_write_text(run.run_dir / STATUS, yaml.safe_dump(status))
    return (score_after_training(study, run, slot) or status) if returncode == 0 else status


def score_after_training(study: StudyConfig, run: RunSpec, slot: Slot) -> dict[str, Any] | None:
    """For a trained arm: what the study scores once training is done, unless done already, each in a warm fork
    of the evaluator's command in the run's slot, logging to `<run>/test.log` (`workbench.study.selection`):
    with `select.test`, the test tasks at the chosen checkpoint (and the base model, `select.base`); with
    `noise`, the last checkpoint re-scored with other sampling seeds. Returns the run's new status where that
    failed (recorded as failed, with the evaluator's last error line), else None."""
    tests = study.select is not None and bool(study.select.test)
    if run.stage != "arm" or run.same_as is not None or not (tests or study.noise is not None):
        return None
    results, jobs, error = results_path(run.run_dir), [], None
    if tests:
        spec = study.select
        step = selected_step(results, spec)
        if step is None:
            error = f"select.by: no checkpoint of the run has '{spec.by}' (is it among eval.tasks, with eval.on_save?)"
        elif not scoring_done(run.run_dir, spec, step, base := base_dir(run.run_dir, run.settings, spec)):
            jobs += scoring_commands(run.run_dir, spec, step, base)
    if study.noise is not None and error is None:
        step = last_step(results)
        section = (yaml.safe_load((run.run_dir / RUN_CONFIG).read_text()) or {}).get("eval") or {}
        if step is None:
            error = "noise: the run has no evaluated checkpoint to re-score (eval.on_save)"
        else:
            jobs += [arguments for _, arguments in noise_commands(run.run_dir, study.noise, step, section)]
    log = run.run_dir / "test.log"
    for arguments in jobs if error is None else []:
        if module_process(EVAL_MODULE, arguments, log, slot.threads, slot.env()) != 0:
            lines = log.read_text().splitlines()
            errors = [line for line in lines if line.startswith("error:")]
            error = f"scoring after training: {errors[-1] if errors else lines[-1] if lines else 'failed'}"
            break
    if error is None:
        return None
    status = {**run_status(run), "status": "failed", "error": error}
    atomic_write_text(run.run_dir / STATUS, yaml.safe_dump(status))
    return status


def run_all(study: StudyConfig, runs: list[RunSpec], parallel: int = 1, executor: str = "local",
            partition: str | None = None, progress: Callable[[str], None] = print) -> bool:
    """Train `runs` (the study's plan, or part of it): the pretrain runs first, then the arms, `parallel`
    at a time (`local`) or as a submitit job array (`slurm`, `submitit-local`).

    Returns False when a pretrain run failed (after all of them ran), and then starts no arm. Raises a
    WorkbenchError when an arm is asked for without the pretrain run it starts from being done or among `runs`,
    and a ConfigError when the study asks for more GPUs than a local machine has (`local_slots`), both before
    any run starts."""
    slots = local_slots(study, parallel) if executor == "local" else []
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
        for run, status in zip(batch, _statuses(study, batch, slots, executor, partition), strict=True):
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


def _statuses(study: StudyConfig, runs: list[RunSpec], slots: list[Slot], executor: str,
              partition: str | None) -> Iterator[dict[str, Any]]:
    """Each run's status, in order, as soon as it and the runs before it are finished (locally, in `slots`)."""
    if executor != "local":
        yield from submit(study, runs, execute, executor, partition)
        return
    yield from in_slots(lambda run, slot: execute(study, run, slot), runs, slots)


def in_slots(function: Callable[[Any, Slot], Any], items: list[Any], slots: list[Slot]) -> Iterator[Any]:
    """`function(item, slot)` for each of `items`, as many at a time as there are `slots` (threads of this
    process, each starting its own process: a run, an evaluation), each item in a slot no other item holds
    while it runs; the results in order, each as soon as it and those before it are done (an exception is
    raised when its item's turn comes)."""
    free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)

    def in_a_slot(item: Any) -> Any:
        slot = free.get()
        try:
            return function(item, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = [pool.submit(in_a_slot, item) for item in items]
        for future in futures:
            yield future.result()


def in_parallel(function: Callable[[Any, int], Any], items: list[Any], parallel: int = 1) -> Iterator[Any]:
    """`function(item, threads)` for each of `items`, `parallel` at a time (`in_slots`), the machine's cores
    shared out (`threads` = cores // parallel, at least 1), without GPUs of their own."""
    slots = [Slot(cpu_share(parallel))] * parallel
    yield from in_slots(lambda item, slot: function(item, slot.threads), items, slots)
