"""Merge a LoRA run's adapter into its base model: `workbench merge` as a script of the checkout (its code: workbench_cli/merge.py).

    python launch/merge.py runs/lora-run --out merged/   # see --help
"""

import sys
from pathlib import Path

try:
    from workbench_cli.merge import main, run
except ModuleNotFoundError as err:  # installed before workbench_cli existed (`pip install -e .` again), or not at all
    if err.name != "workbench_cli":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from workbench_cli.merge import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
