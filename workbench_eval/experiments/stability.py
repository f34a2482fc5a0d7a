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

The runs are a study (`workbench.study`: an `arm` axis times the seeds, in `<runs-dir>/bose-stability/` or
`bose-stability-quick/`, trained resumably by its runner, a finished run skipped), the sweeps go through
`workbench_eval.sweep.sweep_all`, the summaries through `workbench.stats`; the tables go to `stability.md` there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from workbench.bundled import configs_dir
from workbench.config import load_config
from workbench.io import atomic_write_text
from workbench.layout import RUN_CONFIG, results_path
from workbench.processes import preload
from workbench.stats import mean_sd, paired_difference
from workbench.study.plan import RunSpec, StudyConfig, grid
from workbench.study.runner import run_all_or_raise, run_status
from workbench.yaml_text import override_string
from workbench_eval.config import eval_config
from workbench_eval.report import series, stability_of, step_axis
from workbench_eval.results import metric_info, read_results
from workbench_eval.styles import style_colour
from workbench_eval.sweep import run_target, sweep_all

CONFIG = configs_dir() / "bose" / "stability.yaml"  # configs/bose/stability.yaml
REFERENCE_STYLE = "zero_shot"  # the standard prompt every style is compared with
ARMS = {"held_out": {"data.synthetic.hold_out_cloze": True}, "seen": {"data.synthetic.hold_out_cloze": False}}
SEEN_ARM_STYLES = {"factworld_mc": ["blank_ppl", "zero_shot"]}
SHOWN = {("factworld_mc", "acc"), ("factworld_mc", "acc_norm"), ("factworld_qa", "f1"), ("factworld_qa", "em")}


def log_spaced_steps(first: int, last: int, count: int) -> list[int]:
    """`count` distinct integer steps from `first` to `last`, evenly spaced in log(step)."""
    steps = sorted({int(round(s)) for s in np.geomspace(first, last, count)})
    if len(steps) < count:  # rounding merged neighbouring small steps: start later or ask for fewer
        raise ValueError(f"cannot place {count} distinct log-spaced steps between {first} and {last}")
    return steps


def steps_per_epoch(arm: str) -> int:
    """Optimizer steps in one epoch of an arm's pretraining data."""
    from workbench.data import prepare_data

    cfg = load_config(CONFIG, [override_string(key, value) for key, value in ARMS[arm].items()])
    _, blocks = prepare_data(cfg.data, cfg.model)
    return len(blocks["train"]) // cfg.training["per_device_train_batch_size"]


def stability_study(seeds: list[int], steps: list[int], runs_dir: Path, quick: bool) -> StudyConfig:
    """The pretraining runs as a study: `configs/bose/stability.yaml` per arm (`ARMS`) and seed, trained for
    `steps[-1]` steps with a checkpoint at each of `steps`."""
    return StudyConfig(study="bose-stability" + ("-quick" if quick else ""), base=str(CONFIG),
                       description="BOSE stability: the cloze template held out of pretraining or seen in it",
                       set={"training.max_steps": steps[-1], "save_at_steps": steps}, axes={"arm": ARMS},
                       seeds=seeds, runs_dir=str(runs_dir))


def check_schedule(runs: list[RunSpec], steps: list[int]) -> None:
    """Refuse a finished run trained with other checkpoints than `steps` (the runner would skip it)."""
    for run in runs:
        if run_status(run)["status"] == "done":
            saved = (yaml.safe_load((run.run_dir / RUN_CONFIG).read_text()) or {}).get("save_at_steps")
            if saved != steps:
                raise SystemExit(f"error: '{run.run_dir}' was trained with checkpoints at {saved}, not {steps}: "
                                 "give another --runs-dir (or delete it)")


def evaluation_job(run: RunSpec) -> tuple:
    """The `sweep_all` job of one trained run: its target and eval config (the `seen` arm in Blank-ppl and
    zero-shot only)."""
    cfg = eval_config(load_config(CONFIG))
    if run.values["arm"] != "held_out":
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"styles": SEEN_ARM_STYLES[t.task]})
                                               for t in cfg.tasks if t.task in SEEN_ARM_STYLES]})
    return run_target(run.run_dir), cfg


def _best(points: list[dict], metric: str) -> float:
    """The best score of a run's checkpoints (the highest, or the lowest for a lower-is-better metric)."""
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
        final = mean_sd([s[key][-1]["value"] for s in per_seed]).mean
        best = mean_sd([_best(s[key], key[2]) for s in per_seed]).mean
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mean_sd(taus[key]).text(2)} | {delta} | "
                     f"{mean_sd([x.tau_early for x in stats]).text(2)} | "
                     f"{mean_sd([x.frac_improving for x in stats]).mean:.2f} | {final:.3f} | {best:.3f} |")
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
        lines.append(f"| {style} | acc | {mean_sd(tau_h).text(2)} | {mean_sd(tau_s).text(2)} | "
                     f"{paired_difference(tau_s, tau_h).text(2)} | {mean_sd(fin_h).mean:.3f} | "
                     f"{mean_sd(fin_s).mean:.3f} | {paired_difference(fin_s, fin_h).text(3)} |")
    return lines


def prompt_lengths(run: Path, cfg, limit: int) -> dict[tuple[str, str], list[int]]:
    """(task, style) -> the token count of each request's full text (prompt and, for scored options, the option)
    as the run's tokenizer splits it: what must fit in the model's context."""
    from transformers import AutoTokenizer

    from workbench_eval.evaluator import Evaluator

    target = run_target(run)
    tokenizer = AutoTokenizer.from_pretrained(target.tokenizer)
    evaluator = Evaluator(cfg, tokenizer, target.world, limit)
    lengths: dict[tuple[str, str], list[int]] = {}
    for key, task in evaluator.tasks.items():
        texts = [inst.args[0] + (inst.args[1] if isinstance(inst.args[1], str) else "") for inst in task.instances]
        lengths[key] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths


def length_table(run: Path, limit: int, block_size: int) -> list[str]:
    """Per (task, style): the mean and longest prompt in tokens, and whether it fits the block size."""
    lengths = prompt_lengths(run, eval_config(load_config(CONFIG)), limit)
    lines = [f"| task | style | prompt tokens, mean | prompt tokens, max | fits the {block_size}-token block |",
             "|---|---|---:|---:|---|"]
    for (task, style), values in sorted(lengths.items()):
        lines.append(f"| {task} | {style} | {np.mean(values):.0f} | {max(values)} | "
                     f"{'yes' if max(values) <= block_size else 'no'} |")
    return lines


def plot(held: list[dict], seen: list[dict], epoch_steps: int, out: Path) -> None:
    """`bose_stability.png` in `out`: score by checkpoint per style (mean over seeds, band: seed range)."""
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
    """One style's curve on `ax`: the mean over seeds, and the seed range as a band."""
    curves = np.array([[p["value"] for p in s[key]] for s in per_seed if key in s])
    steps = [p["step"] for p in per_seed[0][key]]
    ax.plot(steps, curves.mean(axis=0), marker="o", ms=3, color=colour, linestyle=line, label=label)
    if len(curves) > 1:
        ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=colour, alpha=0.12)


def main() -> None:
    preload("workbench_eval.sweep")  # the warm server imports the evaluator once, before the training runs fork
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--checkpoints", type=int, default=12, help="log-spaced checkpoints per run")
    parser.add_argument("--limit", type=int, default=200, help="items per task")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="the study's folder goes here: bose-stability/ (--quick: bose-stability-quick/)")
    parser.add_argument("--out", type=Path, default=Path("docs") / "img", help="default docs/img (from the checkout)")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained or evaluated at a time, the cores (and GPUs) shared out")
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 checkpoints, 40 items, 40 steps")
    args = parser.parse_args()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the runs and sweeps need nothing from the hub
        os.environ.setdefault(key, "1")
    cfg = load_config(CONFIG)
    epoch = steps_per_epoch("held_out")
    total = round(epoch * cfg.training.get("num_train_epochs", 1))
    if args.quick:
        args.seeds, args.checkpoints, args.limit, total = args.seeds[:1], 6, 40, min(total, 40)
    steps = log_spaced_steps(4, total, args.checkpoints)
    print(f"{len(args.seeds)} seeds x 2 arms x {len(steps)} checkpoints at steps {steps}")
    study = stability_study(args.seeds, steps, args.runs_dir, args.quick)
    arms = grid(study)
    check_schedule(arms, steps)
    run_all_or_raise(study, arms, args.parallel, progress=lambda line: print(line, file=sys.stderr))
    sweep_all([evaluation_job(run) for run in arms], args.limit, args.parallel)
    runs = {arm: [run.run_dir for run in arms if run.values["arm"] == arm] for arm in ARMS}
    held, seen = ([series(read_results(results_path(r))) for r in runs[arm]] for arm in ("held_out", "seen"))
    styles, _ = style_table(held, n_boot=0 if args.quick else 200)
    plot(held, seen, epoch, args.out if not args.quick else study.folder)
    label = "QUICK (smoke test, not a result)" if args.quick else f"{len(args.seeds)} seeds"
    text = "\n".join([
        f"# BOSE stability, {label}", "", f"Checkpoints at steps {steps} (one epoch = {epoch} steps); "
        f"{args.limit} items per task; tau: mean ± standard deviation over seeds; paired differences: mean over "
        "seeds [95% t-interval].", "", "## Every style (cloze template held out)", "", *styles, "",
        "## Blank-ppl: cloze template held out vs seen", "", *cloze_table(held, seen), "",
        "## Prompt lengths", "", *length_table(runs["held_out"][0], args.limit, cfg.data.block_size), ""])
    atomic_write_text(study.folder / "stability.md", text)
    print(text)


if __name__ == "__main__":
    main()
