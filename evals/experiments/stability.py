"""BOSE stability at tiny scale: do ICLiP and Blank-ppl give a steadier signal over checkpoints?

    python evals/experiments/stability.py                 # 3 seeds, 13 log-spaced checkpoints (~10 min CPU)
    python evals/experiments/stability.py --quick         # 1 seed, 6 checkpoints, 40 items: a smoke test

Pretrains a tiny Pythia-shaped model for one epoch on the fact world per seed, saves checkpoints at
log-spaced steps, evaluates every checkpoint in every prompt style, and reports Kendall's tau of score
against step (whole run and the first 30% of checkpoints), mean ± std over seeds, with plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evals.experiments.common import REPO, fmt_ms, log_spaced_steps, mean_std, train
from evals.report import series, stability_of
from evals.results import read_results
from evals.runs import run_target, sweep
from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import load_config
from workbench.io import atomic_write_text
from workbench.layout import results_path

CONFIG = REPO / "configs" / "bose" / "stability.yaml"
METRICS = {("factworld_mc", "acc"), ("factworld_mc", "acc_norm"), ("factworld_qa", "f1"), ("factworld_qa", "em")}


def one_epoch_steps(config_path: Path) -> int:
    from workbench.data import prepare_data

    cfg = load_config(config_path)
    _, blocks = prepare_data(cfg.data, cfg.model)
    return len(blocks["train"]) // cfg.training["per_device_train_batch_size"]


def run_seed(seed: int, steps: list[int], runs_dir: Path, limit: int) -> Path:
    name = f"bose-stability-s{seed}"
    run = runs_dir / name
    final = newest_complete_checkpoint(run, report=lambda _: None) if run.exists() else None
    if final is None or final.name != f"checkpoint-{steps[-1]}":
        train(CONFIG, [f"name={name}", f"seed={seed}", f"runs_dir={runs_dir}", f"training.max_steps={steps[-1]}",
                       f"save_at_steps={steps}"], runs_dir / f"{name}.log")
    cfg = load_config(CONFIG)
    sweep(run_target(run), cfg.eval, limit)
    return run


def summarise(runs: list[Path], out: Path, early_fraction: float, n_boot: int) -> str:
    per_seed = [series(read_results(results_path(run))) for run in runs]
    keys = sorted(k for k in per_seed[0] if (k[0], k[2]) in METRICS)
    lines = ["| task | style | metric | tau (whole run) | tau (first 30%) | improving pairs | successive/total var |"
             " final score |", "|---|---|---|---:|---:|---:|---:|---:|"]
    rows = {}
    for key in keys:
        stats = [stability_of(s[key], n_boot, early_fraction) for s in per_seed if key in s]
        final = [s[key][-1]["value"] for s in per_seed if key in s]
        rows[key] = stats
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {fmt_ms([x.tau for x in stats])} | "
            f"{fmt_ms([x.tau_early for x in stats])} | {mean_std([x.frac_improving for x in stats])[0]:.2f} | "
            f"{mean_std([x.variance_ratio for x in stats])[0]:.2f} | {mean_std(final)[0]:.3f} |"
        )
    plot(per_seed, out)
    return "\n".join(lines)


def plot(per_seed, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (task, metric) in zip(axes, [("factworld_mc", "acc"), ("factworld_qa", "f1")], strict=True):
        for key in sorted(k for k in per_seed[0] if k[0] == task and k[2] == metric):
            curves = np.array([[p["value"] for p in s[key]] for s in per_seed if key in s])
            steps = [p["step"] for p in per_seed[0][key]]
            mean = curves.mean(axis=0)
            ax.plot(steps, mean, marker="o", ms=3, label=key[1])
            if len(curves) > 1:
                ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("training step (log)")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}: {metric} by prompt style (mean, band = seed range)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "bose_stability.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoints", type=int, default=13, help="log-spaced checkpoints per run (>= 12)")
    parser.add_argument("--limit", type=int, default=200, help="items per task")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 checkpoints, 40 items, 60 steps")
    args = parser.parse_args()
    total = one_epoch_steps(CONFIG)
    if args.quick:
        args.seeds, args.checkpoints, args.limit, total = args.seeds[:1], 6, 40, min(total, 60)
    steps = log_spaced_steps(4, total, args.checkpoints)
    print(f"{len(args.seeds)} seeds x {len(steps)} checkpoints at steps {steps}")
    runs = [run_seed(seed, steps, args.runs_dir, args.limit) for seed in args.seeds]
    table = summarise(runs, args.out, early_fraction=0.3, n_boot=0 if args.quick else 200)
    label = "QUICK (smoke test, not a result)" if args.quick else f"{len(args.seeds)} seeds"
    text = f"# BOSE stability, {label}\n\nCheckpoints at steps {steps}; {args.limit} items per task.\n\n{table}\n"
    atomic_write_text(args.runs_dir / "bose-stability.md", text)
    print(text)


if __name__ == "__main__":
    main()
