"""BOSE consistency at tiny scale: does a base model's rank under each prompt style predict the rank of its
instruction-tuned counterpart, across data-mixture ablations?

    python workbench_eval/experiments/consistency.py            # 8 base models (4 fact shares x 2 QA shares)
    python workbench_eval/experiments/consistency.py --quick    # 4 base models, short runs: a smoke test

The base models differ only in their pretraining data mixture, at one token budget (`configs/bose/
consistency.yaml`): the share of text about the evaluated fact world (the rest is text about another world's
entities, `other_share`) and whether question-answer documents about never-asked entities are mixed in
(`qa_share` 0 or 5%). Each is instruction-tuned by one recipe (`RECIPE`, through `launch/train.py`: TRL's
SFTTrainer, loss on the answer) on QA pairs about entities evaluation never asks about (`synthetic:fact_qa`).
Base models are scored in every style; instruct models with plain zero-shot prompts. Per style: Kendall's
tau-b between the base and the instruct scores over the models, and its paired bootstrap difference (over
models) from the zero-shot style's tau; a base-vs-instruct scatter per style.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import load_config
from workbench.data.loading import FactCorpusConfig
from workbench.data.synthetic import FactWorldConfig
from workbench.io import atomic_write_text
from workbench.layout import RUN_CONFIG, checkpoint_dir
from workbench.yaml_text import override_string
from workbench_eval.consistency import (
    INSTRUCT_STYLE,
    consistency_rows,
    consistency_table,
    final_checkpoint_target,
    final_scores,
)
from workbench_eval.experiments.common import REPO, evaluate_all, train_all
from workbench_eval.styles import style_colour

CONFIG = REPO / "configs" / "bose" / "consistency.yaml"
# (share of the text about the evaluated world, share of question-answer documents): 8 data mixtures
FULL = [(fact, qa) for qa in (0.0, 0.05) for fact in (0.25, 0.5, 0.75, 1.0 - qa)]
QUICK = [(0.25, 0.0), (1.0, 0.0), (0.25, 0.05), (0.95, 0.05)]
# One instruction-tuning recipe for every model, so differences between instruct models come from their bases.
RECIPE = {"training.max_steps": 150, "training.per_device_train_batch_size": 16, "training.learning_rate": 1e-3,
          "training.lr_scheduler_type": "cosine", "training.warmup_steps": 10, "data.block_size": 128, "seed": 0}
PRIMARY = {"factworld_mc": "acc", "factworld_qa": "f1"}


def mixture_name(fact: float, qa: float) -> str:
    return f"fact{round(fact * 100)}-qa{round(qa * 100)}"


def base_job(fact: float, qa: float, runs_dir: Path, steps: int | None) -> tuple[Path, tuple | None]:
    """One data mixture's base run and its `train_all` job (None when it is already trained)."""
    name = f"bose-base-{mixture_name(fact, qa)}"
    run = runs_dir / name
    if newest_complete_checkpoint(run, report=lambda _: None) is not None:
        return run, None
    other = round(1.0 - fact - qa, 6)
    return run, (CONFIG, [f"name={name}", f"runs_dir={runs_dir}", f"data.synthetic.other_share={other}",
                          f"data.synthetic.qa_share={qa}", *([f"training.max_steps={steps}"] if steps else [])],
                 runs_dir / f"{name}.log")


def instruct_job(base: Path, recipe: dict) -> tuple[Path, tuple | None]:
    """`base` fine-tuned on the fact world's instruction-tuning QA pairs (the run's own fact world): the instruct
    run and its `train_all` job (None when it is already trained)."""
    run = base.with_name(base.name.replace("bose-base", "bose-instruct"))
    steps = recipe["training.max_steps"]
    if newest_complete_checkpoint(run, report=lambda _: None) is not None and checkpoint_dir(run, steps).is_dir():
        return run, None
    world = dict(yaml.safe_load((base / RUN_CONFIG).read_text())["data"]["synthetic"])
    for corpus_option in set(FactCorpusConfig.__dataclass_fields__) - set(FactWorldConfig.__dataclass_fields__):
        world.pop(corpus_option, None)  # the QA pairs take the world's options only
    settings = {"name": run.name, "runs_dir": str(run.parent), "model.preset": None,
                "model.name_or_path": str(base), "data.source": "synthetic:fact_qa", "data.synthetic": world,
                "training.save_steps": steps, "training.logging_steps": max(1, steps // 10), **recipe}
    return run, (CONFIG, [override_string(k, v) for k, v in settings.items()], run.parent / f"{run.name}.log")


def trained(jobs: list[tuple[Path, tuple | None]], parallel: int) -> list[Path]:
    """Train the runs of `jobs` that are not trained yet, `parallel` at a time; the run folders."""
    train_all([job for _, job in jobs if job is not None], parallel)
    return [run for run, _ in jobs]


def scores(runs: list[Path], cfg, limit: int, parallel: int, styles: list[str] | None = None) -> list[dict]:
    """Each run's final-checkpoint score per (task, style, metric), evaluated (and cached) in `styles`, `parallel`
    runs at a time."""
    if styles is not None:
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"styles": styles}) for t in cfg.tasks]})
    targets = [final_checkpoint_target(run) for run in runs]
    evaluate_all([(target, cfg) for target in targets], limit, parallel)
    return [final_scores(target) for target in targets]


def analyse(names: list[str], base: list[dict], instruct: list[dict], n_boot: int) -> list[dict]:
    """`consistency_rows` over the primary metrics, each row with the models' names (for the scatter)."""
    return [{**row, "models": names} for row in consistency_rows(base, instruct, n_boot, PRIMARY)]


def scatter(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    cols, grid_rows = 5, math.ceil(len(rows) / 5)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.3 * cols, 3.2 * grid_rows), squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):
        ax.scatter(r["base"], r["instruct"], color=style_colour(r["style"]), s=28, zorder=3)
        for x, y, name in zip(r["base"], r["instruct"], r["models"], strict=True):
            ax.annotate(name.replace("fact", "f").replace("-qa", "/q"), (x, y), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
        tau = "undefined" if math.isnan(r["tau"]) else f"{r['tau']:+.2f}"
        ax.set_title(f"{r['task'].split('_')[1]}: {r['style']} (tau {tau})", fontsize=9)
        ax.set_xlabel(f"base model {'accuracy' if r['metric'] == 'acc' else 'answer F1'}", fontsize=8)
        ax.set_ylabel(f"instruct zero-shot {'accuracy' if r['metric'] == 'acc' else 'F1'}", fontsize=8)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Base vs instruction-tuned score, one point per data mixture (f = % fact text, q = % QA "
                 "documents); mc = 4-option multiple choice, qa = open questions", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "bose_consistency.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2, help="runs trained or evaluated at a time, the cores shared out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    grid, recipe = (QUICK, {**RECIPE, "training.max_steps": 20}) if args.quick else (FULL, RECIPE)
    limit, steps = (40, 30) if args.quick else (args.limit, None)
    bases = trained([base_job(fact, qa, args.runs_dir, steps) for fact, qa in grid], args.parallel)
    instructs = trained([instruct_job(base, recipe) for base in bases], args.parallel)
    cfg = load_config(CONFIG).eval
    base_scores = scores(bases, cfg, limit, args.parallel)
    instruct_scores = scores(instructs, cfg, limit, args.parallel, styles=[INSTRUCT_STYLE])
    names = [mixture_name(fact, qa) for fact, qa in grid]
    rows = analyse(names, base_scores, instruct_scores, n_boot=200 if args.quick else 2000)
    out = args.runs_dir / "bose-consistency"
    scatter(rows, out if args.quick else args.out)
    label = "QUICK (smoke test, not a result)" if args.quick else f"{len(bases)} data mixtures"
    text = "\n".join([f"# BOSE consistency ({label})", "", "Models: " + ", ".join(names), "", *consistency_table(rows), ""])
    atomic_write_text(out / "consistency.md", text)
    atomic_write_text(out / "consistency.json", json.dumps(rows, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
