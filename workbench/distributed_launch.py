"""Launching a distributed run's ranks and leaving them: a free rendezvous port (`free_port`, MASTER_PORT) and a
clean exit from a multi-rank run (`exit_distributed`). Light: torch only if the process already loaded it (the
collectives themselves are in `workbench.distributed`)."""

from __future__ import annotations

import atexit
import os
import socket
import sys


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (a rendezvous for a run's ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_distributed(code: int) -> None:
    """Leave a multi-rank run without the interpreter's final teardown.

    After a finished two-rank CPU run, about one exit in ten to thirty aborted in C++ static destruction
    ("terminate called without an active exception", no Python frame left, SIGABRT), even after
    `destroy_process_group()`, which turned a complete run into a failed exit code. Everything the run writes
    is closed by then, so after a successful run a rank that was part of a process group tears it down, runs
    the Python exit handlers (logging, trackers such as wandb), flushes its streams and leaves with `os._exit`.
    Measured: 0 failed exits in 40 two-rank runs, against 1 in 30 with `destroy_process_group()` alone."""
    if code == 0 and "torch" in sys.modules:  # after an error, exit as usual: the launcher stops the other ranks
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears down while another still talks to it
            dist.destroy_process_group()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)
