"""Training runs forked from a warm process: `launch/train.py` without paying its imports once per run.

A study of many short runs spent a large share of its time importing: torch, transformers and the workbench
take about 6 s of one core per process, against 15-30 s of training for a repetition-study run on this
project's CPU. Each run here is a fresh process (nothing leaks from one run to the next; seeding is the
run's own), forked from a `multiprocessing` forkserver that imported those modules once. The forkserver is
single-threaded and has run no torch operation, so a fork from it is as safe as a new interpreter.

Where the platform has no forkserver, or `WORKBENCH_COLD_START=1` is set, each run is a new interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
# What `launch/train.py` imports before and during a run (the forkserver imports them once).
PRELOAD = ["workbench.config", "workbench.run", "evals.on_save"]


def cold_start() -> bool:
    """True when runs start as new interpreters (no forkserver here, or WORKBENCH_COLD_START=1)."""
    return (os.environ.get("WORKBENCH_COLD_START", "") not in ("", "0")
            or "forkserver" not in multiprocessing.get_all_start_methods())


def train_process(args: list[str], log: Path, threads: int | None = None, env: dict[str, str] | None = None) -> int:
    """Run `python launch/train.py *args` with stdout and stderr appended to `log`; its exit code.

    `threads` caps torch's intra-op threads (as OMP_NUM_THREADS does for a new interpreter); `env` is added to
    the run's environment."""
    env = {**(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if cold_start():
        with log.open("a") as handle:
            return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=REPO, env={**os.environ, **env},
                                  stdout=handle, stderr=subprocess.STDOUT).returncode
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    process = context.Process(target=_train_main, args=(args, str(log), threads, env), name="launch/train.py")
    process.start()
    process.join()
    return process.exitcode if process.exitcode is not None else 1


def _train_main(args: list[str], log: str, threads: int | None, env: dict[str, str]) -> None:
    """The forked child: output to `log`, the thread cap, then `launch/train.py`'s main; exits with its code."""
    import importlib.util

    os.environ.update(env)
    os.chdir(REPO)
    sys.stdout.flush()
    sys.stderr.flush()
    handle = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 -- the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if threads:
        import torch

        torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("launch_train", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [str(TRAIN_SCRIPT), *args]
    module.exit_distributed(module.main(args))
