"""BOSE consistency at tiny scale: does a base model's rank under each prompt style predict the rank of its
instruction-tuned counterpart?

    python evals/experiments/consistency.py            # 6 base models (2 sizes x 3 lengths), ~15 min CPU
    python evals/experiments/consistency.py --quick    # 3 tiny models, short runs: a smoke test

Each base model is pretrained on the fact world, then instruction-tuned by one recipe (`RECIPE`, through
`launch/train.py` like any fine-tuning run: TRL's SFTTrainer, loss on the answer) on QA pairs about entities
that evaluation never asks about (`synthetic:fact_qa`). Base models are scored in every style; instruct models
with plain zero-shot prompts; Kendall's tau-b between the two rankings, per task, style and metric.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from evals.consistency import evaluate_consistency
from evals.experiments.common import REPO, train
from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import load_config, override_string
from workbench.io import atomic_write_text
from workbench.layout import RUN_CONFIG, checkpoint_dir

CONFIG = REPO / "configs" / "bose" / "consistency.yaml"
FULL = [("pythia-tiny", 60), ("pythia-tiny", 150), ("pythia-tiny", 377),
        ("pythia-small", 60), ("pythia-small", 150), ("pythia-small", 377)]
QUICK = [("pythia-tiny", 20), ("pythia-tiny", 40), ("pythia-tiny", 80)]
# One instruction-tuning recipe for every model, so differences between instruct models come from their bases.
RECIPE = {"training.max_steps": 150, "training.per_device_train_batch_size": 16, "training.learning_rate": 1e-3,
          "training.lr_scheduler_type": "cosine", "training.warmup_steps": 10, "data.block_size": 128, "seed": 0}


def base_run(preset: str, steps: int, runs_dir: Path) -> Path:
    name = f"bose-base-{preset.split('-')[1]}-{steps}"
    run = runs_dir / name
    if newest_complete_checkpoint(run, report=lambda _: None) is None:
        train(CONFIG, [f"name={name}", f"runs_dir={runs_dir}", f"model.preset={preset}",
                       f"training.max_steps={steps}"], runs_dir / f"{name}.log")
    return run


def instruct_run(base: Path, recipe: dict) -> Path:
    """`base` fine-tuned on the fact world's instruction-tuning QA pairs (the run's own fact world)."""
    run = base.with_name(base.name.replace("bose-base", "bose-instruct"))
    steps = recipe["training.max_steps"]
    if newest_complete_checkpoint(run, report=lambda _: None) is None or not checkpoint_dir(run, steps).is_dir():
        world = dict(yaml.safe_load((base / RUN_CONFIG).read_text())["data"]["synthetic"])
        world.pop("sentences_per_fact", None)  # a corpus option; the QA pairs take the world's options only
        settings = {"name": run.name, "runs_dir": str(run.parent), "model.preset": None,
                    "model.name_or_path": str(base), "data.source": "synthetic:fact_qa", "data.synthetic": world,
                    "training.save_steps": steps, "training.logging_steps": max(1, steps // 10), **recipe}
        train(CONFIG, [override_string(k, v) for k, v in settings.items()], run.parent / f"{run.name}.log")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    grid, recipe = (QUICK, {**RECIPE, "training.max_steps": 20}) if args.quick else (FULL, RECIPE)
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
