"""The workbench trainer's per-step overhead against a plain `transformers.Trainer`, interleaved in one run.

    python bench/trainer_overhead.py                            # defaults: about 3-5 minutes on 2 CPU cores
    python bench/trainer_overhead.py --precision fp32 --repeats 5 --steps 30 --json bench-overhead.json
    python bench/trainer_overhead.py --deepspeed none --preset pythia-medium --batch-size 8

Both arms train the same fresh model (same seed), on the same packed quickstart data, with the same
`TrainingArguments` (built by `workbench.run.training_arguments`, as a real run builds them) and the same
DeepSpeed config (`configs/deepspeed/zero2.json`, in this one process; `--deepspeed none` turns it off).
The arms alternate A B, B A, ... for `--repeats` repeats, each a fresh trainer trained for `--warmup` + `--steps`
steps; only the last `--steps` are timed. A step's time is the wall time between consecutive `on_step_end`
callbacks, so it includes fetching the batch; hooks split it into forward, backward, optimizer and the rest.

It prints, for each precision path it ran (fp32, and bf16 where this CPU runs bf16 matmuls at least half as
fast as fp32; it always says which it ran and why):
  - the workbench/plain step-time ratio (of the median step times; target <= 1.03) with its spread: the ratio
    of each repeat's pair, their mean +- 2 standard errors (leaving out repeats that another process visibly
    slowed, marked *), the ratio of the fastest quartiles, and each arm's median step time with its IQR;
  - tokens/s of each arm, and whether both arms reached the same training loss (they do the same work);
  - model-FLOPs utilisation: FLOPs/step = (6 N + 12 L d T) x tokens/step, N = parameters that take part in
    matmuls (all but the input embedding; a tied lm head counts once), L layers, d width, T block size,
    against the peak of a 2048 x 2048 matmul measured in this run (fp32; bf16 also shown), and the rate of a
    matmul of the model's own MLP shape; each rate is the best of measurements before, between and after
    the repeats;
  - where a step's time goes: forward, backward, optimizer, the rest of the step, and between steps (data);
    per arm also the trainer's construction time and its startup (train() to the first step: DeepSpeed's engine
    and the data loader; the first arm of a process may also build DeepSpeed's CPU ops once);
  - the load average before and after, since other processes on the same cores make every number noisy.
`--json OUT` also writes everything, per-step times included, as JSON (atomically).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import deepspeed
import torch
import transformers
from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, set_seed

from workbench.config import ExperimentConfig, load_config
from workbench.data import prepare_data
from workbench.io import atomic_write_text
from workbench.models import build_model
from workbench.precision import choose_precision
from workbench.run import training_arguments
from workbench.trainer import WorkbenchTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import PEAK_N, StepTimer, best_rates, cpu_name, device, measure_matmuls, set_threads  # noqa: E402

BF16_MIN_FRACTION = 0.5  # run the bf16 arm only where a bf16 matmul runs at least this fraction of fp32's rate
TARGET_RATIO = 1.03
DISTURBED = 1.5  # a repeat whose median step is this much slower than its arm's overall median was disturbed
ARMS = ("plain", "workbench")
PHASES = ("between", "forward", "backward", "optimizer", "in_step_other")
PHASE_NAMES = {
    "between": "between steps (batch fetch + collate, log/save checks)",
    "forward": "forward (model call incl. loss)",
    "backward": "backward (under DeepSpeed incl. ZeRO's gradient hooks)",
    "optimizer": "optimizer",
    "in_step_other": "rest of step (input prep, loss checks, grad norm, lr schedule, zero_grad, callbacks)",
}
# TrainingArguments from the config that would make a step do more than train (eval, save, log) are dropped.
DROPPED_TRAINING_PREFIXES = ("eval", "per_device_eval", "save", "logging", "load_best", "metric_for_best", "report")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="experiment YAML (model and data)")
    parser.add_argument("--preset", default="pythia-small", help="model preset (default pythia-small: d 256, 4 layers)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat and arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=6, help="A/B pairs per precision (order alternates)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-device train batch size")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per training block")
    parser.add_argument("--deepspeed", default="configs/deepspeed/zero2.json", help="DeepSpeed JSON, or 'none'")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="both",
                        help="both: fp32 and (where this CPU runs it fast enough) bf16; auto: as a run would choose")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override another config field, e.g. --set model.overrides.num_hidden_layers=2")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch_size", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's time is measured from the end of a warm-up step)")
    return args


# --- the machine ---------------------------------------------------------------------------------------------
def plan_precisions(requested: str, peaks: dict[str, float], width: int) -> tuple[list[str], list[str]]:
    """The precision paths to run and one line of why for each decision."""
    ratio = peaks["bf16"] / peaks["fp32"]
    measured = f"bf16 matmul {peaks['bf16']:.0f} GFLOP/s = {ratio:.2f}x fp32 ({peaks['fp32']:.0f})"
    if requested == "auto":
        choice, why = choose_precision("auto", width)
        return [choice], [f"{choice}: what `precision: auto` picks here ({why})"]
    wanted = ["fp32", "bf16"] if requested == "both" else [requested]
    plan, notes = [], []
    for precision in wanted:
        if precision == "bf16" and device() == "cpu" and ratio < BF16_MIN_FRACTION:
            notes.append(f"bf16: SKIPPED: {measured} < {BF16_MIN_FRACTION}x: this CPU has no fast bf16 path")
            continue
        plan.append(precision)
        notes.append(f"{precision}: requested" + (f" ({measured})" if precision == "bf16" else ""))
    if not plan:
        plan, notes = ["fp32"], notes + ["fp32: run instead, as nothing else was left"]
    return plan, notes


# --- the experiment ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_env() -> None:
    """What DeepSpeed needs to start in one plain `python` process (kept where a launcher already set it)."""
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def load_bench_config(args: argparse.Namespace, runs_dir: str) -> ExperimentConfig:
    """The experiment config with the bench's model, data, DeepSpeed and training fields."""
    deepspeed = "null" if args.deepspeed.lower() == "none" else args.deepspeed
    overrides = [f"model.preset={args.preset}", f"data.block_size={args.block_size}", f"deepspeed={deepspeed}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    kept = {k: v for k, v in cfg.training.items() if not k.startswith(DROPPED_TRAINING_PREFIXES)}
    cfg.training = {
        **kept,
        "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "report_to": [],
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    cfg.runs_dir = runs_dir
    return cfg


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all (each tensor once) but an untied input embedding."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return total - (0 if tied else embedding.numel())


@dataclass
class ModelShape:
    params: int
    matmul_params: int
    layers: int
    width: int
    intermediate: int
    vocab: int


def model_shape(model: torch.nn.Module) -> ModelShape:
    config = model.config
    return ModelShape(
        params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        matmul_params=matmul_params(model),
        layers=config.num_hidden_layers,
        width=config.hidden_size,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
    )


def flops_per_token(shape: ModelShape, block_size: int) -> dict[str, float]:
    """Training FLOPs per token: 6 N (weights, forward + backward) and 12 L d T (attention scores and values)."""
    return {"weights": 6.0 * shape.matmul_params, "attention": 12.0 * shape.layers * shape.width * block_size}


@dataclass
class ArmRun:
    arm: str
    precision: str
    repeat: int
    step_s: list[float]
    phases_s: dict[str, list[float]]  # per timed step
    tokens_per_step: int
    construct_s: float
    startup_s: float
    train_loss: float
    threads: int
    optimizer_hook: str


def run_arm(arm: str, precision: str, repeat: int, cfg: Any, tokenizer: Any, blocks: Any, warmup: int) -> ArmRun:
    """Build a fresh model and trainer of `arm` and train it; the timings of its steps after warm-up."""
    cfg.name = f"{precision}-{arm}-{repeat}"
    args = training_arguments(cfg, precision)
    set_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer)
    timer = StepTimer(warmup)
    kwargs = dict(model=model, args=args, train_dataset=blocks["train"], processing_class=tokenizer,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[timer])
    start = time.perf_counter()
    trainer = WorkbenchTrainer(**kwargs, methods=[]) if arm == "workbench" else Trainer(**kwargs)
    construct_s = time.perf_counter() - start
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict, in both arms alike
    timer.attach(trainer)
    output = trainer.train()
    steps = timer.steps
    phases = {p: [s.get(p, float("nan")) for s in steps] for p in PHASES}
    result = ArmRun(arm, precision, repeat, [s["step"] for s in steps], phases,
                    int(statistics.median(timer.tokens)), construct_s, timer.startup_s, float(output.training_loss),
                    timer.threads, timer.optimizer_hook)
    del trainer, model, output, timer
    gc.collect()
    return result


# --- the report ----------------------------------------------------------------------------------------------
def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class ArmSummary:
    arm: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    tokens_per_step: int
    tokens_per_s: float
    achieved_gflops: float
    mfu_fp32_peak: float
    mfu_own_peak: float
    phase_fraction: dict[str, float]
    construct_s: float
    startup_s: float
    train_losses: list[float]
    threads: list[int]


def summarise_arm(runs: list[ArmRun], flops_token: float, peaks: dict[str, float]) -> ArmSummary:
    steps = [t for run in runs for t in run.step_s]
    q1, median, q3 = quartiles(steps)
    tokens = runs[0].tokens_per_step
    gflops = flops_token * tokens / median / 1e9
    medians = {p: statistics.median(t for run in runs for t in run.phases_s[p]) for p in PHASES}
    phases = {p: medians[p] / sum(medians.values()) for p in PHASES}  # medians: robust to disturbed steps
    return ArmSummary(
        arm=runs[0].arm, median_ms=median * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, tokens_per_step=tokens,
        tokens_per_s=tokens / median, achieved_gflops=gflops, mfu_fp32_peak=gflops / peaks["fp32"],
        mfu_own_peak=gflops / peaks[runs[0].precision], phase_fraction=phases,
        construct_s=statistics.median(r.construct_s for r in runs),
        startup_s=statistics.median(r.startup_s for r in runs),
        train_losses=[r.train_loss for r in runs], threads=sorted({r.threads for r in runs}),
    )


def mean_and_margin(values: list[float]) -> tuple[float, float]:
    """The mean and two standard errors of it (inf with one value)."""
    if len(values) < 2:
        return values[0], float("inf")
    return statistics.fmean(values), 2 * statistics.stdev(values) / len(values) ** 0.5


def per_repeat_ratios(runs: list[ArmRun]) -> tuple[list[float], list[bool]]:
    """Each repeat's workbench/plain ratio of median step times, and whether the repeat was disturbed: an arm's
    median step more than DISTURBED x that arm's median over all repeats (another process took the cores)."""
    overall = {arm: statistics.median(t for r in runs if r.arm == arm for t in r.step_s) for arm in ARMS}
    by_repeat: dict[int, dict[str, float]] = {}
    for run in runs:
        by_repeat.setdefault(run.repeat, {})[run.arm] = statistics.median(run.step_s)
    pairs = [r for _, r in sorted(by_repeat.items()) if len(r) == 2]
    ratios = [r["workbench"] / r["plain"] for r in pairs]
    disturbed = [any(r[arm] > DISTURBED * overall[arm] for arm in ARMS) for r in pairs]
    return ratios, disturbed


def print_precision(precision: str, runs: list[ArmRun], flops: dict[str, float], peaks: dict[str, float],
                    matmul_shape: tuple[int, int, int]) -> dict[str, Any]:
    flops_token = sum(flops.values())
    arms = {arm: summarise_arm([r for r in runs if r.arm == arm], flops_token, peaks) for arm in ARMS}
    plain, bench = arms["plain"], arms["workbench"]
    ratio = bench.median_ms / plain.median_ms
    repeats, disturbed = per_repeat_ratios(runs)
    clean = [r for r, bad in zip(repeats, disturbed, strict=True) if not bad]
    print(f"\n== {precision} ==")
    print(f"{'arm':<10} {'step ms: median [IQR]':>24} {'tokens/s':>9} {'GFLOP/s':>8} "
          f"{'MFU/fp32 pk':>11} {'MFU/' + precision + ' pk':>11} {'construct s':>11} {'startup s':>9}")
    for s in (plain, bench):
        print(f"{s.arm:<10} {s.median_ms:>8.1f} [{s.q1_ms:7.1f} -{s.q3_ms:7.1f}] {s.tokens_per_s:>9.0f} "
              f"{s.achieved_gflops:>8.1f} {s.mfu_fp32_peak:>11.1%} {s.mfu_own_peak:>11.1%} "
              f"{s.construct_s:>11.2f} {s.startup_s:>9.2f}")
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    print(f"workbench/plain step-time ratio (medians): {ratio:.3f}  target <= {TARGET_RATIO}: {verdict}")
    listed = ", ".join(f"{r:.3f}" + ("*" if bad else "") for r, bad in zip(repeats, disturbed, strict=True))
    print(f"  per-repeat ratios: {listed}  (median {statistics.median(repeats):.3f}, range {min(repeats):.3f} - "
          f"{max(repeats):.3f})")
    mean, margin = mean_and_margin(clean) if clean else (float("nan"), float("inf"))
    excluded = f", leaving out the {len(repeats) - len(clean)} disturbed (*)" if len(clean) < len(repeats) else ""
    print(f"  mean of the per-repeat ratios{excluded}: {mean:.3f} +- {margin:.3f} (2 standard errors)")
    if any(disturbed):
        print(f"  * an arm's median step there was over {DISTURBED}x its median over all repeats: another process "
              f"had the cores")
    print(f"  ratio of the fastest quartiles (Q1 step times): {bench.q1_ms / plain.q1_ms:.3f}")
    if margin > TARGET_RATIO - 1:
        print(f"  NOTE: +-{margin:.3f} is wider than the {TARGET_RATIO - 1:.0%} being tested, so this run cannot "
              f"resolve it: other load on the cores (see the load average) or too few --repeats/--steps")
    same = all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(plain.train_losses, bench.train_losses, strict=True))
    print(f"  training loss after the run: plain {plain.train_losses[0]:.5f}, workbench {bench.train_losses[0]:.5f}"
          f" ({'identical in every repeat' if same else 'DIFFERENT: the arms did not do the same work'})")
    m, k, n = matmul_shape
    shaped = peaks[f"mlp_{precision}"]
    print(f"  matmul rate: peak {PEAK_N}^3 {peaks[precision]:.0f} GFLOP/s; model MLP shape ({m}x{k} @ {k}x{n}) "
          f"{shaped:.0f} GFLOP/s; training achieves {plain.achieved_gflops:.0f} (plain) = "
          f"{plain.achieved_gflops / shaped:.0%} of the MLP-shaped rate")
    print("  where a step's time goes (each phase's median over the timed steps, as a share of their sum):")
    for phase in PHASES:
        print(f"    {PHASE_NAMES[phase]:<88} plain {plain.phase_fraction[phase]:6.1%}   "
              f"workbench {bench.phase_fraction[phase]:6.1%}")
    return {"ratio": ratio, "per_repeat_ratios": repeats, "disturbed_repeats": disturbed,
            "undisturbed_repeat_ratio_mean_margin": [mean, margin],
            "q1_ratio": bench.q1_ms / plain.q1_ms, "target": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
            "losses_identical": same, "mlp_shaped_gflops": shaped, "arms": {a: asdict(s) for a, s in arms.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads()
    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    print(f"[bench] torch {torch.__version__}, transformers {transformers.__version__}, "
          f"deepspeed {deepspeed.__version__}, python {platform.python_version()}")
    print(f"[bench] device {device()}: {cpu_name()}; torch threads {threads} (= cores available to this process)")
    print(f"[bench] before: {load_note(threads)}")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as runs_dir:
        cfg = load_bench_config(args, runs_dir)
        if cfg.deepspeed:
            distributed_env()
        tokenizer, blocks = prepare_data(cfg.data, cfg.model)
        set_seed(cfg.seed)
        shape = model_shape(build_model(cfg.model, tokenizer))
        flops = flops_per_token(shape, args.block_size)
        matmul_shape = (args.batch_size * args.block_size, shape.width, shape.intermediate)
        matmuls = [measure_matmuls(matmul_shape, seconds=1.0)]
        peaks_before = matmuls[0]
        plan, notes = plan_precisions(args.precision, peaks_before, shape.width)
        print(f"[bench] config {args.config}: preset {args.preset}, {shape.params / 1e6:.2f}M parameters "
              f"({shape.matmul_params / 1e6:.2f}M in matmuls), L {shape.layers}, d {shape.width}, "
              f"vocab {shape.vocab}; {len(blocks['train'])} training blocks of {args.block_size} tokens")
        print(f"[bench] DeepSpeed: {cfg.deepspeed or 'off'}; batch {args.batch_size}; {args.repeats} repeats x "
              f"({args.warmup} warm-up + {args.steps} timed steps) per arm, arms alternating")
        print(f"[bench] matmul GFLOP/s before: {PEAK_N}^3 fp32 {peaks_before['fp32']:.0f}, bf16 {peaks_before['bf16']:.0f}; "
              f"MLP shape {'x'.join(map(str, matmul_shape))} fp32 {peaks_before['mlp_fp32']:.0f}, "
              f"bf16 {peaks_before['mlp_bf16']:.0f}")
        print("[bench] precision paths: " + "; ".join(notes))
        if cfg.deepspeed and "bf16" in plan:
            print("[bench]   (bf16 under DeepSpeed is DeepSpeed's bf16 mode: bf16 weights and activations, fp32 "
                  "master weights in the ZeRO optimizer; without DeepSpeed it is torch.autocast on fp32 weights)")
        runs = run_all(args, cfg, plan, tokenizer, blocks, lambda: matmuls.append(measure_matmuls(matmul_shape, 0.3)))
    print(f"[bench] after the runs: {load_note(threads)}")
    matmuls.append(measure_matmuls(matmul_shape, seconds=1.0))
    peaks = best_rates(matmuls)
    print_header(flops, shape, args, matmuls, runs)
    results: dict[str, Any] = {}
    for precision in plan:
        results[precision] = print_precision(precision, [r for r in runs if r.precision == precision], flops,
                                             peaks, matmul_shape)
    elapsed = time.perf_counter() - started
    print(f"\n[bench] done in {elapsed:.0f} s")
    if args.json:
        record = {"argv": sys.argv[1:], "settings": vars(args) | {"json": str(args.json)}, "threads": threads,
                  "cpu": cpu_name(), "deepspeed": cfg.deepspeed, "precision_notes": notes, "model": asdict(shape),
                  "flops_per_token": flops, "matmul_gflops": matmuls, "peaks": peaks,
                  "results": results, "runs": [asdict(r) for r in runs], "elapsed_s": elapsed}
        atomic_write_text(args.json, json.dumps(finite(record), indent=2, default=str) + "\n")
        print(f"[bench] wrote {args.json}")
    return 0


def run_all(args: argparse.Namespace, cfg: Any, plan: list[str], tokenizer: Any, blocks: Any,
            between_repeats: Callable[[], None]) -> list[ArmRun]:
    """Every repeat of every precision, the two arms alternating their order from one repeat to the next."""
    runs = []
    for repeat in range(args.repeats):
        for precision in plan:
            order = ARMS if repeat % 2 == 0 else ARMS[::-1]
            for arm in order:
                run = run_arm(arm, precision, repeat, cfg, tokenizer, blocks, args.warmup)
                runs.append(run)
                print(f"[bench] repeat {repeat + 1}/{args.repeats} {precision:<4} {arm:<9} median step "
                      f"{statistics.median(run.step_s) * 1e3:7.1f} ms (construct {run.construct_s:.2f} s, "
                      f"startup {run.startup_s:.2f} s, loss {run.train_loss:.4f})", flush=True)
        between_repeats()
    return runs


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float as None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def load_note(threads: int) -> str:
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    one, five, _ = os.getloadavg()
    busy = " (above the thread count: other processes share these cores, expect noise)" if one > threads + 0.5 else ""
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min){busy}"


def print_header(flops: dict[str, float], shape: ModelShape, args: argparse.Namespace,
                 matmuls: list[dict[str, float]], runs: list[ArmRun]) -> None:
    print(f"\n[bench] matmul GFLOP/s measured {len(matmuls)} times (before, after each repeat, after); the best of "
          f"each is used, the worst shows how much other processes took:")
    names = {"fp32": f"{PEAK_N}^3 fp32", "bf16": f"{PEAK_N}^3 bf16", "mlp_fp32": "MLP shape fp32",
             "mlp_bf16": "MLP shape bf16"}
    print("[bench]   " + "; ".join(f"{label} best {max(m[key] for m in matmuls):.0f}, worst "
                                  f"{min(m[key] for m in matmuls):.0f}" for key, label in names.items()))
    print(f"[bench] FLOPs/token = 6 N + 12 L d T = 6 x {shape.matmul_params:,} + 12 x {shape.layers} x {shape.width} "
          f"x {args.block_size} = {flops['weights'] / 1e6:.1f}M + {flops['attention'] / 1e6:.1f}M "
          f"(N: all parameters but the untied input embedding; attention at full T, causal mask not discounted)")
    hooks = sorted({r.optimizer_hook for r in runs})
    threads = sorted({r.threads for r in runs})
    print(f"[bench] optimizer phase = {'; '.join(hooks)}; torch threads during training: {threads}")


if __name__ == "__main__":
    sys.exit(main())
