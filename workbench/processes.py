"""How the study runner and the experiments start their processes: training runs of the train command
(`workbench train`) and evaluation sweeps forked from a warm process, without paying their imports once per
run, and with tcmalloc where the machine has it.

A study of many short runs spent a large share of its time importing: torch, transformers and the workbench
take about 6 s of one core per process, against 15-30 s of training for a repetition-study run on this
project's CPU. Each run here is a fresh process (nothing leaks from one run to the next; seeding is the
run's own), forked from a `multiprocessing` forkserver that imported those modules once. The forkserver is
single-threaded and has run no torch operation, so a fork from it is as safe as a new interpreter.

Where the platform has no forkserver, or `WORKBENCH_COLD_START=1` is set, each run is a new interpreter
(`python -m workbench_cli.train`). Either way a run works in the current directory of the process that starts
it, where its relative paths (`runs_dir`, `data.cache_dir`) are.

Both start with tcmalloc as the memory allocator where the machine has it (`libtcmalloc_minimal`, e.g. Debian's
`libtcmalloc-minimal4`): PyTorch on CPU allocates and frees many small tensors per step, and glibc's malloc
makes a tiny model's training step 8-14% slower on this project's CPU (`bench/allocator.py`; the same
numbers to the last bit, only the allocator differs). This is what PyTorch's own CPU launcher does
(`python -m torch.backends.xeon.run_cpu --enable-tcmalloc`). `WORKBENCH_MALLOC=system` keeps glibc's; a
`LD_PRELOAD` already set is left as it is.

All of this is tuning for CPU training, and is off on a machine with CUDA devices (`cuda_machine`): there every
run is a new interpreter (a CUDA context does not survive a fork, and the libraries the warm server imports may
initialise the CUDA driver while they load), started with the system allocator and no thread cap; the few
seconds of imports are small beside a GPU run, and the GPUs each run sees are set by the runner
(`workbench.study.runner`, CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The train command's module, run as `python -m` runs it: by name, as the library never imports the command layer.
TRAIN_MODULE = "workbench_cli.train"
# What the forkserver imports once, before any fork: the library and the train command (which imports what it
# needs of the evaluator); the layers above add their own with `preload` before the first warm process.
PRELOAD = ["workbench.config", "workbench.run", TRAIN_MODULE]


def preload(*modules: str) -> None:
    """Have the warm server import `modules` once (e.g. the evaluator's sweep, whose forks then start without
    importing lm-eval); effective when called before the first `warm_process` or `train_process` of a process."""
    PRELOAD.extend(module for module in modules if module not in PRELOAD)


def cuda_machine() -> bool:
    """True when this machine has CUDA devices that this process may use. Asked through
    `torch.cuda.device_count`, which counts through NVML where it can and initialises no CUDA state of torch's
    (so nothing here stops this process, or a process it forks, from using CUDA later); False without torch."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.device_count() > 0


def allocator_env() -> dict[str, str]:
    """The environment that makes a new process allocate with tcmalloc (`LD_PRELOAD`), or {} where there is no
    tcmalloc, `WORKBENCH_MALLOC=system` is set, `LD_PRELOAD` is set already, or this is a CUDA machine."""
    import ctypes.util

    if (os.environ.get("WORKBENCH_MALLOC", "tcmalloc") == "system" or os.environ.get("LD_PRELOAD")
            or cuda_machine()):
        return {}
    library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    # a report line per allocation over 1 GiB is tcmalloc's default: keep stderr to real warnings
    return {"LD_PRELOAD": library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)} if library else {}


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment that caps a new process at `threads` intra-op threads (OMP_NUM_THREADS), or {} without a
    cap or on a CUDA machine, where the CPU's threads feed the GPU rather than share out the training."""
    return {"OMP_NUM_THREADS": str(threads)} if threads and not cuda_machine() else {}


def cpu_tuning_env(threads: int | None) -> dict[str, str]:
    """What a new process of a CPU run starts with: tcmalloc (`allocator_env`) and the thread cap
    (`thread_env`); {} on a CUDA machine."""
    return {**allocator_env(), **thread_env(threads)}


def cold_start() -> bool:
    """True when runs start as new interpreters: on a CUDA machine (`cuda_machine`), where there is no
    forkserver, or with WORKBENCH_COLD_START=1."""
    return (os.environ.get("WORKBENCH_COLD_START", "") not in ("", "0")
            or "forkserver" not in multiprocessing.get_all_start_methods() or cuda_machine())


def train_process(args: list[str], log: Path, threads: int | None = None, env: dict[str, str] | None = None) -> int:
    """Run `python -m workbench_cli.train *args` (what `launch/train.py` runs) in the current directory, with
    stdout and stderr appended to `log`; its exit code.

    `threads` caps torch's intra-op threads on CPU (as OMP_NUM_THREADS does for a new interpreter); `env` is
    added to the run's environment (e.g. its GPUs, CUDA_VISIBLE_DEVICES)."""
    return module_process(TRAIN_MODULE, args, log, threads, env)


def module_process(module: str, args: list[str], log: Path, threads: int | None = None,
                   env: dict[str, str] | None = None) -> int:
    """`python -m <module> *args` for a command module with a `run(argv)` (the train command, the evaluator's
    `workbench_cli.eval`), as `train_process` runs the train command; its exit code."""
    if cold_start():
        env = {**os.environ, **allocator_env(), **(env or {}), **thread_env(threads)}
        with log.open("a") as handle:
            return subprocess.run([sys.executable, "-m", module, *args], env=env,
                                  stdout=handle, stderr=subprocess.STDOUT).returncode
    return warm_process(_module_script, (module, args), log, threads, env)


def warm_process(function: Callable[..., Any], args: tuple, log: Path, threads: int | None = None,
                 env: dict[str, str] | None = None) -> int:
    """`function(*args)` in a process forked from the warm server (a new interpreter, `spawn`, where
    `cold_start`), its output appended to `log`, on CPU torch capped at `threads` intra-op threads, `env` added
    to its environment, in this process's current directory; the exit code (0 when it returns, 1 on an
    exception, whose traceback goes to `log`; a `SystemExit` gives its own code). `function` must be importable
    by name (it is pickled)."""
    threads = threads if not cuda_machine() else None
    env = {**(env or {}), **thread_env(threads)}
    log.touch()  # there even when the child dies before it writes
    if cold_start():
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _start_forkserver(allocator_env())
    process = context.Process(target=_child, args=(function, args, str(log), threads, env, os.getcwd()),
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


def _child(function: Callable[..., Any], args: tuple, log: str, threads: int | None, env: dict[str, str],
           cwd: str) -> None:
    """The forked (or spawned) child: the starting process's directory `cwd` (the forkserver's may be another),
    output to `log`, the environment and thread cap, then `function(*args)`. Refuses to go on (RuntimeError)
    in a fork of a process that had initialised CUDA, where CUDA cannot work."""
    _refuse_forked_cuda()
    os.environ.update(env)
    os.chdir(cwd)
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


def _refuse_forked_cuda() -> None:
    """Raise RuntimeError when this process is a fork of one that had initialised CUDA (torch then marks the
    child a "bad fork": its first CUDA call would fail deep inside the run)."""
    in_bad_fork = getattr(getattr(sys.modules.get("torch"), "cuda", None), "_is_in_bad_fork", None)
    if in_bad_fork is not None and in_bad_fork():
        raise RuntimeError("this run was forked from a process that had initialised CUDA; start runs as new "
                           "interpreters (WORKBENCH_COLD_START=1)")


def _module_script(module: str, args: list[str]) -> None:
    """`python -m <module> *args` in this process: the command's `run`, leaving as it does (exit code through
    SystemExit)."""
    import importlib

    command = importlib.import_module(module)
    sys.argv = [command.__file__, *args]  # as `python -m` has it
    command.run(args)
