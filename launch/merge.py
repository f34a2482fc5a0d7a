"""Merge a LoRA run's adapter into its base model: `workbench merge` as a script of the checkout (its code: workbench_cli/merge.py).

    python launch/merge.py runs/lora-run --out merged/   # see --help
"""

from workbench_cli.merge import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
