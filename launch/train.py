"""Train one experiment.

    deepspeed launch/train.py                                   # the quickstart (configs/quickstart.yaml)
    deepspeed --num_gpus 2 launch/train.py configs/quickstart.yaml --set training.max_steps=50
    deepspeed --hostfile hostfile launch/train.py my.yaml       # several nodes
    python launch/train.py my.yaml --resume                     # one process, no launcher
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys

from workbench.config import DEFAULT_CONFIG, load_config
from workbench.errors import WorkbenchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set training.learning_rate=1e-3 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete the run's folder and start over")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = parser.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(args.config, args.overrides)
        from workbench.run import train  # heavy imports after the config is known to be good

        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if rank0:
        from workbench.report import print_run_summary

        print_run_summary(result, args.config, args.overrides)
    return 0


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


if __name__ == "__main__":
    exit_distributed(main())
