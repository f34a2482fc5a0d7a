"""Train one experiment: `workbench train` as a script of the checkout (its code: workbench_cli/train.py).

    deepspeed launch/train.py [config.yaml] [--set KEY=VALUE ...]   # see --help
"""

import sys
from pathlib import Path

try:
    from workbench_cli.train import main, run
except ModuleNotFoundError as err:  # installed before workbench_cli existed (`pip install -e .` again), or not at all
    if err.name != "workbench_cli":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from workbench_cli.train import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
