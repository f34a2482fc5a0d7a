"""The `workbench` command: one subcommand per entry point, as `axolotl train` or `llamafactory-cli train`.

    workbench train [config.yaml] [--set KEY=VALUE ...]   # train one experiment (default: the quickstart)
    workbench eval runs/quickstart                        # evaluate a run's checkpoints with the BOSE evaluator
    workbench study configs/studies/example.yaml          # a grid of training runs, then one table and report
    workbench merge runs/lora-run --out merged/lora-run   # a LoRA run's adapter merged into its base model

Each subcommand takes exactly the arguments of its script in a checkout (`launch/<command>.py`); see
`workbench <command> --help`. Built-in configs go by their names in the docs (`configs/quickstart.yaml`) from
any directory. Under DeepSpeed's launcher: `deepspeed --module workbench_cli.train config.yaml`.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from workbench.distributed_launch import exit_distributed
from workbench.errors import did_you_mean


class Command(NamedTuple):
    module: str  # the module with the subcommand's `main(argv, prog)`
    summary: str


COMMANDS = {
    "train": Command("workbench_cli.train", "train one experiment (launch/train.py)"),
    "eval": Command("workbench_cli.eval", "evaluate checkpoints with the BOSE evaluator (launch/eval.py)"),
    "study": Command("workbench_cli.study", "run a study: a grid of training runs, one table and report "
                                            "(launch/study.py)"),
    "merge": Command("workbench_cli.merge", "merge a LoRA run's adapter into its base model (launch/merge.py)"),
}
USAGE = "usage: workbench [-h] [--version] {" + ",".join(COMMANDS) + "} ..."


def help_text() -> str:
    """What `workbench --help` prints: the usage, the subcommands and examples."""
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join([USAGE, "", __doc__.strip(), "", "commands:", *rows, "",
                      "options:", "  -h, --help  show this help message and exit",
                      "  --version   print the installed version and exit"])


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("llm-workbench")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run `workbench ARGV`: the subcommand's exit code (2 for a missing or unknown subcommand)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ranks = []  # `deepspeed <the workbench script> train ...` puts --local_rank before the subcommand
    while argv and argv[0].startswith("--local_rank"):
        ranks.append(argv.pop(0))
        if ranks[-1] == "--local_rank" and argv:
            ranks.append(argv.pop(0))
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    if argv and argv[0] == "--version":
        print(f"workbench {version()}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command '{argv[0]}'{did_you_mean(argv[0], COMMANDS)}" if argv else "give a command"
        print(f"{USAGE}\nerror: {given}; valid: {', '.join(COMMANDS)} (see workbench --help)", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name].module)  # only the one asked for: `--help` stays light
    return module.main(rest + ranks, prog=f"workbench {name}")


def run() -> None:
    """The console script `workbench`: exit with the subcommand's code (a multi-rank run as `exit_distributed`
    leaves it)."""
    exit_distributed(main())


if __name__ == "__main__":
    run()
