"""Evaluate checkpoints with the BOSE evaluator: `workbench eval` as a script of the checkout (its code: workbench_cli/eval.py).

    python launch/eval.py runs/quickstart   # see --help
"""

import sys
from pathlib import Path

try:
    from workbench_cli.eval import main, run
except ModuleNotFoundError as err:  # installed before workbench_cli existed (`pip install -e .` again), or not at all
    if err.name != "workbench_cli":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from workbench_cli.eval import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
