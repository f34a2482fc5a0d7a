"""BOSE stability at tiny scale: which prompt style gives the steadiest signal over checkpoints?

    python workbench_eval/experiments/stability.py                 # 3 seeds x 2 arms, 12 log-spaced checkpoints
    python workbench_eval/experiments/stability.py --quick         # 1 seed, 6 checkpoints, 40 items: a smoke test

Per seed, two pretraining runs of `configs/bose/stability.yaml` that differ only in the cloze template:
`held_out` (the reference: no statement in pretraining uses the sentence Blank-ppl's cloze is built from) and
`seen` (every statement template in pretraining). Both mix question-answer documents about entities that are
never asked about into pretraining (`qa_share`), so the question formats of the standard prompts are not new
to the model. Every checkpoint of the `held_out` run is evaluated in every style; the `seen` run in Blank-ppl
and zero-shot only. Reported: Kendall's tau of score against step (whole run and first 30%), per style its
paired difference from the zero-shot style (same seed), final and best scores, Blank-ppl seen minus held out,
and the prompt lengths in tokens against the block size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import load_config
from workbench.io import atomic_write_text
from workbench.layout import results_path
from workbench.stats import paired_difference
from workbench_eval.experiments.common import (
    REPO,
    evaluate_all,
    fmt_ms,
    log_spaced_steps,
    mean_std,
    prompt_lengths,
    train_all,
)
from workbench_eval.report import series, stability_of, step_axis
from workbench_eval.results import metric_info, read_results
from workbench_eval.styles import style_colour
from workbench_eval.sweep import run_target

CONFIG = REPO / "configs" / "bose" / "stability.yaml"
REFERENCE_STYLE = "zero_shot"  # the standard prompt every style is compared with
ARMS = {"held_out": ["data.synthetic.hold_out_cloze=true"], "seen": ["data.synthetic.hold_out_cloze=false"]}
SEEN_ARM_STYLES = {"factworld_mc": ["blank_ppl", "zero_shot"]}
SHOWN = {("factworld_mc", "acc"), ("factworld_mc", "acc_norm"), ("factworld_qa", "f1"), ("factworld_qa", "em")}


def steps_per_epoch(overrides: list[str]) -> int:
    from workbench.data import prepare_data

    cfg = load_config(CONFIG, overrides)
    _, blocks = prepare_data(cfg.data, cfg.model)
    return len(blocks["train"]) // cfg.training["per_device_train_batch_size"]


def training_job(arm: str, seed: int, steps: list[int], runs_dir: Path) -> tuple | None:
    """The `train_all` job of one (arm, seed) run; None when its last checkpoint is already there."""
    name = f"bose-stability-{arm}-s{seed}"
    run = runs_dir / name
    final = newest_complete_checkpoint(run, report=lambda _: None) if run.exists() else None
    if final is not None and final.name == f"checkpoint-{steps[-1]}":
        return None
    return (CONFIG, [f"name={name}", f"seed={seed}", f"runs_dir={runs_dir}", f"training.max_steps={steps[-1]}",
                     f"save_at_steps={steps}", *ARMS[arm]], runs_dir / f"{name}.log")


def evaluation_job(arm: str, seed: int, runs_dir: Path) -> tuple:
    """The `evaluate_all` job of one trained (arm, seed) run: its target and eval config (the `seen` arm in
    Blank-ppl and zero-shot only)."""
    cfg = load_config(CONFIG).eval
    if arm != "held_out":
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"styles": SEEN_ARM_STYLES[t.task]})
                                               for t in cfg.tasks if t.task in SEEN_ARM_STYLES]})
    return run_target(runs_dir / f"bose-stability-{arm}-s{seed}"), cfg


def _best(points: list[dict], metric: str) -> float:
    values = [p["value"] for p in points]
    return max(values) if metric_info(metric).higher_is_better else min(values)


def style_table(per_seed: list[dict], n_boot: int) -> tuple[list[str], dict]:
    """Per (task, style, metric): tau over seeds, its paired difference from the zero-shot style, final, best."""
    keys = sorted(k for k in per_seed[0] if (k[0], k[2]) in SHOWN)
    lines = ["| task | style | metric | tau, whole run | tau − tau(zero-shot), paired [95% CI] | tau, first 30% "
             "| improving pairs | final score | best score |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    taus = {}
    for key in keys:
        stats = [stability_of(s[key], n_boot, 0.3) for s in per_seed]
        taus[key] = [x.tau for x in stats]
        reference = (key[0], REFERENCE_STYLE, key[2])
        delta = "(reference)" if key[1] == REFERENCE_STYLE else (
            paired_difference(taus[key], [stability_of(s[reference], 0, 0.3).tau for s in per_seed]).text(2)
            if all(reference in s for s in per_seed) else "–")
        final = mean_std([s[key][-1]["value"] for s in per_seed])[0]
        best = mean_std([_best(s[key], key[2]) for s in per_seed])[0]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {fmt_ms(taus[key])} | {delta} | "
                     f"{fmt_ms([x.tau_early for x in stats])} | {mean_std([x.frac_improving for x in stats])[0]:.2f} | "
                     f"{final:.3f} | {best:.3f} |")
    return lines, taus


def cloze_table(held: list[dict], seen: list[dict]) -> list[str]:
    """Blank-ppl (and zero-shot for contrast) with the cloze template held out of pretraining vs seen in it."""
    lines = ["| style | metric | tau, held out | tau, seen | tau seen − held out [95% CI] | final acc, held out | "
             "final acc, seen | final seen − held out [95% CI] |", "|---|---|---:|---:|---|---:|---:|---|"]
    for style in SEEN_ARM_STYLES["factworld_mc"]:
        key = ("factworld_mc", style, "acc")
        tau_h = [stability_of(s[key], 0, 0.3).tau for s in held]
        tau_s = [stability_of(s[key], 0, 0.3).tau for s in seen]
        fin_h = [s[key][-1]["value"] for s in held]
        fin_s = [s[key][-1]["value"] for s in seen]
        lines.append(f"| {style} | acc | {fmt_ms(tau_h)} | {fmt_ms(tau_s)} | {paired_difference(tau_s, tau_h).text(2)} "
                     f"| {mean_std(fin_h)[0]:.3f} | {mean_std(fin_s)[0]:.3f} | {paired_difference(fin_s, fin_h).text(3)} |")
    return lines


def length_table(run: Path, limit: int, block_size: int) -> list[str]:
    lengths = prompt_lengths(run, load_config(CONFIG).eval, limit)
    lines = [f"| task | style | prompt tokens, mean | prompt tokens, max | fits the {block_size}-token block |",
             "|---|---|---:|---:|---|"]
    for (task, style), values in sorted(lengths.items()):
        lines.append(f"| {task} | {style} | {np.mean(values):.0f} | {max(values)} | "
                     f"{'yes' if max(values) <= block_size else 'no'} |")
    return lines


def plot(held: list[dict], seen: list[dict], epoch_steps: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    panels = [(held, "factworld_mc", "acc", "multiple choice (cloze template held out)"),
              (held, "factworld_qa", "f1", "open-ended questions (generation)")]
    for ax, (per_seed, task, metric, title) in zip(axes, panels, strict=False):
        for key in sorted(k for k in per_seed[0] if k[0] == task and k[2] == metric):
            _band(ax, per_seed, key, key[1], style_colour(key[1]), "-")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("accuracy" if metric == "acc" else "answer token F1")
    ax = axes[2]
    for per_seed, arm, line in ((held, "held out", "-"), (seen, "seen", "--")):
        for style in SEEN_ARM_STYLES["factworld_mc"]:
            _band(ax, per_seed, ("factworld_mc", style, "acc"), f"{style}, cloze template {arm}", style_colour(style), line)
    ax.set_title("multiple choice: cloze template held out (solid) vs seen (dashed)", fontsize=10)
    ax.set_ylabel("accuracy")
    steps = [p["step"] for p in next(iter(held[0].values()))]
    for ax in axes:
        step_axis(ax, steps)
        ax.set_xlabel(ax.get_xlabel() + f"; one epoch = {epoch_steps} steps")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(0, min(1.0, max(0.1, ax.get_ylim()[1] * 1.05)))
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):
        ax.axhline(0.25, color="0.35", linestyle=":", linewidth=1, label="chance (1 of 4)")
    for ax in axes:
        ax.legend(fontsize=7.5, title="prompt style", title_fontsize=8, loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(f"Score by checkpoint: line = mean over {len(held)} seeds, band = seed range (min to max)", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "bose_stability.png", dpi=110)
    plt.close(fig)


def _band(ax, per_seed: list[dict], key: tuple, label: str, colour: str, line: str) -> None:
    curves = np.array([[p["value"] for p in s[key]] for s in per_seed if key in s])
    steps = [p["step"] for p in per_seed[0][key]]
    ax.plot(steps, curves.mean(axis=0), marker="o", ms=3, color=colour, linestyle=line, label=label)
    if len(curves) > 1:
        ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=colour, alpha=0.12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoints", type=int, default=12, help="log-spaced checkpoints per run")
    parser.add_argument("--limit", type=int, default=200, help="items per task")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained or evaluated at a time, the cores shared out")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 checkpoints, 40 items, 40 steps")
    args = parser.parse_args()
    cfg = load_config(CONFIG)
    epoch = steps_per_epoch(ARMS["held_out"])
    total = round(epoch * cfg.training.get("num_train_epochs", 1))
    if args.quick:
        args.seeds, args.checkpoints, args.limit, total = args.seeds[:1], 6, 40, min(total, 40)
    steps = log_spaced_steps(4, total, args.checkpoints)
    print(f"{len(args.seeds)} seeds x 2 arms x {len(steps)} checkpoints at steps {steps}")
    jobs = [training_job(arm, seed, steps, args.runs_dir) for arm in ARMS for seed in args.seeds]
    train_all([job for job in jobs if job is not None], parallel=args.parallel)
    evaluate_all([evaluation_job(arm, seed, args.runs_dir) for arm in ARMS for seed in args.seeds], args.limit,
                 parallel=args.parallel)
    runs = {arm: [args.runs_dir / f"bose-stability-{arm}-s{seed}" for seed in args.seeds] for arm in ARMS}
    held, seen = ([series(read_results(results_path(r))) for r in runs[arm]] for arm in ("held_out", "seen"))
    styles, _ = style_table(held, n_boot=0 if args.quick else 200)
    plot(held, seen, epoch, args.out if not args.quick else args.runs_dir / "bose-stability-quick")
    label = "QUICK (smoke test, not a result)" if args.quick else f"{len(args.seeds)} seeds"
    text = "\n".join([
        f"# BOSE stability, {label}", "", f"Checkpoints at steps {steps} (one epoch = {epoch} steps); "
        f"{args.limit} items per task; tau: mean ± standard deviation over seeds; paired differences: mean over "
        "seeds [95% t-interval].", "", "## Every style (cloze template held out)", "", *styles, "",
        "## Blank-ppl: cloze template held out vs seen", "", *cloze_table(held, seen), "",
        "## Prompt lengths", "", *length_table(runs["held_out"][0], args.limit, cfg.data.block_size), ""])
    atomic_write_text(args.runs_dir / "bose-stability.md", text)
    print(text)


if __name__ == "__main__":
    main()
