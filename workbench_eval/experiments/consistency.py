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

The runs are one two-stage study (`workbench.study`, in `<runs-dir>/bose-consistency/` or `bose-consistency-quick/`):
a pretrain run per data mixture (the base models, `pretrain_mixture=<mixture>/`), then one arm per mixture that
fine-tunes it (the instruct models, `mixture=<mixture>_seed=0/`), trained resumably by the study runner (a
finished run skipped); the sweeps go through `workbench_eval.sweep.sweep_all`. The tables go to
`consistency.md` and `consistency.json` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from workbench.bundled import configs_dir
from workbench.config import load_config
from workbench.data.loading import FactCorpusConfig
from workbench.data.synthetic import FactWorldConfig
from workbench.io import atomic_write_text
from workbench.processes import preload
from workbench.study.plan import PretrainSpec, StudyConfig, grid, plan, pretrain_for
from workbench.study.runner import run_all_or_raise
from workbench_eval.config import eval_config
from workbench_eval.consistency import (
    INSTRUCT_STYLE,
    consistency_rows,
    consistency_table,
    final_checkpoint_target,
    final_scores,
)
from workbench_eval.styles import style_colour
from workbench_eval.sweep import sweep_all

CONFIG = configs_dir() / "bose" / "consistency.yaml"  # configs/bose/consistency.yaml
# (share of the text about the evaluated world, share of question-answer documents): 8 data mixtures
FULL = [(fact, qa) for qa in (0.0, 0.05) for fact in (0.25, 0.5, 0.75, 1.0 - qa)]
QUICK = [(0.25, 0.0), (1.0, 0.0), (0.25, 0.05), (0.95, 0.05)]
# One instruction-tuning recipe for every model, so differences between instruct models come from their bases.
RECIPE = {"training.max_steps": 150, "training.per_device_train_batch_size": 16, "training.learning_rate": 1e-3,
          "training.lr_scheduler_type": "cosine", "training.warmup_steps": 10, "data.block_size": 128, "seed": 0}
PRIMARY = {"factworld_mc": "acc", "factworld_qa": "f1"}


def mixture_name(fact: float, qa: float) -> str:
    """A data mixture's name: `fact25-qa5` = 25% of the text about the evaluated world, 5% QA documents."""
    return f"fact{round(fact * 100)}-qa{round(qa * 100)}"


def world() -> dict[str, Any]:
    """The fact world's options of `CONFIG` (every base model's: its mixture changes corpus options only), which
    the instruction-tuning QA pairs take (`synthetic:fact_qa`)."""
    options = dict(load_config(CONFIG).data.synthetic)
    for corpus_option in set(FactCorpusConfig.__dataclass_fields__) - set(FactWorldConfig.__dataclass_fields__):
        options.pop(corpus_option, None)  # the QA pairs take the world's options only
    return options


def consistency_study(mixtures: list[tuple[float, float]], recipe: dict[str, Any], runs_dir: Path,
                      base_steps: int | None, quick: bool) -> StudyConfig:
    """The base and instruct models as a two-stage study: per data mixture a pretrain run of `CONFIG` (the base
    model, `base_steps` steps, default the config's), and an arm that fine-tunes it by `recipe` on the fact
    world's instruction-tuning QA pairs (the instruct model)."""
    names = {mixture_name(fact, qa): (fact, qa) for fact, qa in mixtures}
    steps = recipe["training.max_steps"]
    return StudyConfig(
        study="bose-consistency" + ("-quick" if quick else ""), base=str(CONFIG), runs_dir=str(runs_dir),
        description="BOSE consistency: base models of several data mixtures and their instruction-tuned versions",
        axes={"mixture": {name: {} for name in names}}, seeds=[recipe["seed"]],
        set={"data.source": "synthetic:fact_qa", "data.synthetic": world(), "training.save_steps": steps,
             "training.logging_steps": max(1, steps // 10), **recipe},
        pretrain=PretrainSpec(
            config=str(CONFIG), per="mixture", set={"training.max_steps": base_steps} if base_steps else {},
            set_per_value={name: {"data.synthetic.other_share": round(1.0 - fact - qa, 6),
                                  "data.synthetic.qa_share": qa} for name, (fact, qa) in names.items()}))


def scores(runs: list[Path], cfg, limit: int, parallel: int, styles: list[str] | None = None) -> list[dict]:
    """Each run's final-checkpoint score per (task, style, metric), evaluated (and cached) in `styles`, `parallel`
    runs at a time."""
    if styles is not None:
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"styles": styles}) for t in cfg.tasks]})
    targets = [final_checkpoint_target(run) for run in runs]
    sweep_all([(target, cfg) for target in targets], limit, parallel)
    return [final_scores(target) for target in targets]


def analyse(names: list[str], base: list[dict], instruct: list[dict], n_boot: int) -> list[dict]:
    """`consistency_rows` over the primary metrics, each row with the models' names (for the scatter)."""
    return [{**row, "models": names} for row in consistency_rows(base, instruct, n_boot, PRIMARY)]


def scatter(rows: list[dict], out: Path) -> None:
    """`bose_consistency.png` in `out`: base against instruct score per style, one point per data mixture."""
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
    preload("workbench_eval.sweep")  # the warm server imports the evaluator once, before the training runs fork
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="the study's folder goes here: bose-consistency/ (--quick: bose-consistency-quick/)")
    parser.add_argument("--out", type=Path, default=Path("docs") / "img", help="default docs/img (from the checkout)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2, help="runs trained or evaluated at a time, the cores (and GPUs) shared out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the runs and sweeps need nothing from the hub
        os.environ.setdefault(key, "1")
    mixtures, recipe = (QUICK, {**RECIPE, "training.max_steps": 20}) if args.quick else (FULL, RECIPE)
    limit, steps = (40, 30) if args.quick else (args.limit, None)
    study = consistency_study(mixtures, recipe, args.runs_dir, steps, args.quick)
    run_all_or_raise(study, plan(study), args.parallel, progress=lambda line: print(line, file=sys.stderr))
    arms = grid(study)
    bases = [pretrain_for(study, arm.values).run_dir for arm in arms]
    instructs = [arm.run_dir for arm in arms]
    cfg = eval_config(load_config(CONFIG))
    base_scores = scores(bases, cfg, limit, args.parallel)
    instruct_scores = scores(instructs, cfg, limit, args.parallel, styles=[INSTRUCT_STYLE])
    names = [arm.values["mixture"] for arm in arms]
    rows = analyse(names, base_scores, instruct_scores, n_boot=200 if args.quick else 2000)
    out = study.folder
    scatter(rows, out if args.quick else args.out)
    label = "QUICK (smoke test, not a result)" if args.quick else f"{len(bases)} data mixtures"
    text = "\n".join([f"# BOSE consistency ({label})", "", "Models: " + ", ".join(names), "", *consistency_table(rows), ""])
    atomic_write_text(out / "consistency.md", text)
    atomic_write_text(out / "consistency.json", json.dumps(rows, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
