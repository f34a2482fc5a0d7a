"""Evaluate checkpoints with the BOSE evaluator: `workbench eval` as a script of the checkout (its code: workbench_cli/eval.py).

    python launch/eval.py runs/quickstart   # see --help
"""

from workbench_cli.eval import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
