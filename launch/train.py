"""Train one experiment: `workbench train` as a script of the checkout (its code: workbench_cli/train.py).

    deepspeed launch/train.py [config.yaml] [--set KEY=VALUE ...]   # see --help
"""

from workbench_cli.train import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
