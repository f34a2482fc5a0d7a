"""Run a study: `workbench study` as a script of the checkout (its code: workbench_cli/study.py).

    python launch/study.py configs/studies/example.yaml   # see --help
"""

from workbench_cli.study import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
