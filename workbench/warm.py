"""Training runs forked from a warm process: `launch/train.py` without paying its imports once per run.

A study of many short runs spent a large share of its time importing: torch, transformers and the workbench
take about 6 s of one core per process, against 15-30 s of training for a repetition-study run on this
project's CPU. Each run here is a fresh process (nothing leaks from one run to the next; seeding is the
run's own), forked from a `multiprocessing` forkserver that imported those modules once. The forkserver is
single-threaded and has run no torch operation, so a fork from it is as safe as a new interpreter.

Where the platform has no forkserver, or `WORKBENCH_COLD_START=1` is set, each run is a new interpreter.

Both start with tcmalloc as the memory allocator where the machine has it (`libtcmalloc_minimal`, e.g. Debian's
`libtcmalloc-minimal4`): PyTorch on CPU allocates and frees many small tensors per step, and glibc's malloc
makes a tiny model's training step 8-14% slower on this project's CPU (`bench/allocator.py`; the same
numbers to the last bit, only the allocator differs). This is what PyTorch's own CPU launcher does
(`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`). `WORKBENCH_MALLOC=system` keeps glibc's; a
`LD_PRELOAD` already set is left as it is.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
# What `launch/train.py` and the evaluator import (the forkserver imports them once).
PRELOAD = ["workbench.config", "workbench.run", "workbench_eval.on_save", "workbench_eval.sweep"]


def allocator_env() -> dict[str, str]:
    """The environment that makes a new process allocate with tcmalloc (`LD_PRELOAD`), or {} where there is no
    tcmalloc, `WORKBENCH_MALLOC=system` is set, or `LD_PRELOAD` is set already."""
    import ctypes.util

    if os.environ.get("WORKBENCH_MALLOC", "tcmalloc") == "system" or os.environ.get("LD_PRELOAD"):
        return {}
    library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    # a report line per allocation over 1 GiB is tcmalloc's default: keep stderr to real warnings
    return {"LD_PRELOAD": library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)} if library else {}


def cold_start() -> bool:
    """True when runs start as new interpreters (no forkserver here, or WORKBENCH_COLD_START=1)."""
    return (os.environ.get("WORKBENCH_COLD_START", "") not in ("", "0")
            or "forkserver" not in multiprocessing.get_all_start_methods())


def train_process(args: list[str], log: Path, threads: int | None = None, env: dict[str, str] | None = None) -> int:
    """Run `python launch/train.py *args` with stdout and stderr appended to `log`; its exit code.

    `threads` caps torch's intra-op threads (as OMP_NUM_THREADS does for a new interpreter); `env` is added to
    the run's environment."""
    if cold_start():
        env = {**os.environ, **allocator_env(), **(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        with log.open("a") as handle:
            return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args], cwd=REPO, env=env,
                                  stdout=handle, stderr=subprocess.STDOUT).returncode
    return warm_process(_train_script, (args,), log, threads, env)


def warm_process(function: Callable[..., Any], args: tuple, log: Path, threads: int | None = None,
                 env: dict[str, str] | None = None) -> int:
    """`function(*args)` in a process forked from the warm server, its output appended to `log`, torch capped at
    `threads` intra-op threads; the exit code (0 when it returns, 1 on an exception, whose traceback goes to
    `log`; a `SystemExit` gives its own code). `function` must be importable by name (it is pickled)."""
    env = {**(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log.touch()  # there even when the child dies before it writes
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    _start_forkserver(allocator_env())
    process = context.Process(target=_child, args=(function, args, str(log), threads, env),
                              name=getattr(function, "__name__", "warm"))
    process.start()
    process.join()
    return process.exitcode if process.exitcode is not None else 1


def _start_forkserver(extra_env: dict[str, str]) -> None:
    """Start the forkserver (once per process) with `extra_env` in its environment, which its forks inherit;
    this process's own environment is left as it was."""
    from multiprocessing import forkserver

    saved = {key: os.environ.get(key) for key in extra_env}
    os.environ.update(extra_env)
    try:
        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child(function: Callable[..., Any], args: tuple, log: str, threads: int | None, env: dict[str, str]) -> None:
    """The forked child: output to `log`, the environment and thread cap, then `function(*args)`."""
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
    function(*args)


def _train_script(args: list[str]) -> None:
    """`launch/train.py`'s main on `args`, leaving as the script does (exit code through SystemExit)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_train", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [str(TRAIN_SCRIPT), *args]
    module.exit_distributed(module.main(args))
