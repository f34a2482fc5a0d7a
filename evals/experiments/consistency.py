"""BOSE consistency at tiny scale: does a base model's rank under each prompt style predict the rank of its
instruction-tuned counterpart?

    python evals/experiments/consistency.py            # 6 base models (2 sizes x 3 lengths), ~15 min CPU
    python evals/experiments/consistency.py --quick    # 3 tiny models, short runs: a smoke test

Each base model is pretrained on the fact world, then instruction-tuned with one TRL SFT recipe on QA pairs
about entities that evaluation never asks about. Base models are scored in every style; instruct models
with plain zero-shot prompts; Kendall's tau-b between the two rankings, per task, style and metric.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from evals.consistency import evaluate_consistency
from evals.data import factworld_sft
from evals.experiments.common import REPO, train
from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import load_config
from workbench.io import atomic_write_text
from workbench.sft import SFTRecipe, instruction_tune

CONFIG = REPO / "configs" / "bose" / "consistency.yaml"
FULL = [("pythia-tiny", 60), ("pythia-tiny", 150), ("pythia-tiny", 377),
        ("pythia-small", 60), ("pythia-small", 150), ("pythia-small", 377)]
QUICK = [("pythia-tiny", 20), ("pythia-tiny", 40), ("pythia-tiny", 80)]


def base_run(preset: str, steps: int, runs_dir: Path) -> Path:
    name = f"bose-base-{preset.split('-')[1]}-{steps}"
    run = runs_dir / name
    if newest_complete_checkpoint(run, report=lambda _: None) is None:
        train(CONFIG, [f"name={name}", f"runs_dir={runs_dir}", f"model.preset={preset}",
                       f"training.max_steps={steps}"], runs_dir / f"{name}.log")
    return run


def instruct_run(base: Path, recipe: SFTRecipe) -> Path:
    run = base.with_name(base.name.replace("bose-base", "bose-instruct"))
    if not (run / f"checkpoint-{recipe.max_steps}").is_dir():
        config = yaml.safe_load((base / "config.yaml").read_text())
        world = config["data"]["synthetic"]
        final = newest_complete_checkpoint(base, report=print)
        instruction_tune(final, base / "tokenizer", factworld_sft(**world), run, recipe, config)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    grid, recipe = (QUICK, SFTRecipe(max_steps=20)) if args.quick else (FULL, SFTRecipe())
    limit = 40 if args.quick else args.limit
    bases = [base_run(preset, steps, args.runs_dir) for preset, steps in grid]
    instructs = [instruct_run(base, recipe) for base in bases]
    out = args.runs_dir / "bose-consistency"
    rows = evaluate_consistency(bases, instructs, load_config(CONFIG).eval, out, limit, n_boot=1000)
    label = "QUICK (smoke test, not a result)" if args.quick else f"{len(bases)} base/instruct pairs"
    text = (out / "consistency.md").read_text()
    atomic_write_text(out / "consistency.md", text.replace("# Consistency", f"# Consistency ({label})", 1))
    for row in rows:
        print(f"{row['task']:14} {row['style']:17} {row['metric']:5} tau {row['tau']:+.2f}  base {row['base']}  "
              f"instruct {row['instruct']}")


if __name__ == "__main__":
    main()
