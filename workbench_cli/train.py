"""Train one experiment (`workbench train`; `launch/train.py` in a checkout).

    deepspeed launch/train.py                                   # the quickstart (configs/quickstart.yaml)
    deepspeed --num_gpus 2 launch/train.py configs/quickstart.yaml --set training.max_steps=50
    deepspeed --hostfile hostfile launch/train.py my.yaml       # several nodes
    python launch/train.py my.yaml --resume                     # one process, no launcher
    python launch/train.py my.yaml --dry-run                    # check and print the resolved config only
    python launch/train.py --list presets                       # or methods, deepspeed
    workbench train my.yaml --set training.max_steps=50         # the installed command, in any directory
    deepspeed --module workbench_cli.train my.yaml              # the installed module under the launcher
    srun --ntasks-per-node 4 python -m workbench_cli.train my.yaml  # Slurm: one task per GPU, one or more nodes
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from workbench.config import DEFAULT_CONFIG, ExperimentConfig, load_config
from workbench.distributed_launch import LAUNCHER_VARIABLES, exit_distributed, free_port, slurm_environment
from workbench.errors import ConfigError, WorkbenchError
from workbench_eval.config import check_eval_section


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...` with exit code 2, like every other bad input."""

    def __init__(self, *args, command: str = "python launch/train.py", **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.command} --help)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of `launch/train.py` (`prog`: the command's name when it is not the script's, e.g.
    `workbench train`)."""
    from workbench.report import LIST_KINDS

    named = {"prog": prog, "command": prog} if prog else {}
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, **named)
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set training.learning_rate=1e-3 (repeatable)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    start.add_argument("--overwrite", action="store_true", help="delete the run's folder (checkpoints too) and start over")
    parser.add_argument("--dry-run", "--print-config", dest="dry_run", action="store_true",
                        help="validate and print the resolved config as YAML, then exit without writing anything")
    parser.add_argument("--list", choices=LIST_KINDS, help="print the presets, methods or DeepSpeed configs and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by `deepspeed`
    return parser


def launch_environment(cfg: ExperimentConfig) -> str | None:
    """Set this process's rank and rendezvous where no launcher did: from Slurm's variables for a task of an
    `srun` job step of several tasks (`workbench.distributed_launch.slurm_environment`), else a world of one
    process where DeepSpeed is configured (`single_process_environment`); the line that says so, or None.
    Raises ConfigError (before anything is written) for a Slurm variable it cannot read."""
    slurm = slurm_environment()
    if not slurm:
        return single_process_environment(cfg)
    os.environ.update(slurm)
    return (f"[workbench] Slurm job step: {os.environ['WORLD_SIZE']} ranks, rendezvous at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")


def single_process_environment(cfg: ExperimentConfig) -> str | None:
    """Make a launcher-less run with DeepSpeed configured a world of one process.

    DeepSpeed reads its rank and rendezvous from RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT,
    which a launcher sets; without them it looks for MPI (and fails without mpi4py). When no launcher
    variable is set, set them (MASTER_ADDR/MASTER_PORT only where not given) and return the line that says
    so; None when there is nothing to do."""
    if cfg.deepspeed is None or any(v in os.environ for v in LAUNCHER_VARIABLES):
        return None
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return (f"[workbench] no launcher: one process with DeepSpeed ({cfg.deepspeed}), rendezvous at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the command line `argv`; the exit code (2 for bad input, 3 for a diverged run)."""
    try:
        args = build_parser(prog).parse_args(argv)
        if args.list:
            from workbench.report import listing

            print(listing(args.list))
            return 0
        cfg = load_config(args.config, args.overrides)
        check_eval_section(cfg, args.config, args.overrides)  # the evaluator's `eval:` section (not the library's)
        if args.dry_run:
            from workbench.report import resolved_config_text

            print(resolved_config_text(cfg, args.config, args.overrides), end="")
            return 0
        note = launch_environment(cfg)
        rank0 = int(os.environ.get("RANK", "0")) == 0
        if rank0:
            print(*filter(None, [note, f"[workbench] run folder {cfg.run_dir}"]), sep="\n", flush=True)
        from workbench.run import train
        from workbench_eval.on_save import (
            eval_on_save_callbacks,  # heavy imports after the config is known to be good
        )

        result = train(cfg, resume=args.resume, overwrite=args.overwrite, callbacks=eval_on_save_callbacks(cfg))
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if rank0:
        from workbench.report import print_run_summary

        print_run_summary(result, args.config, args.overrides)
    return 0


def run(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`main` as a program: exit with its code, leaving a multi-rank run as `exit_distributed` does."""
    exit_distributed(main(argv, prog))


if __name__ == "__main__":  # python -m workbench_cli.train (what `deepspeed --module workbench_cli.train` runs)
    run()
