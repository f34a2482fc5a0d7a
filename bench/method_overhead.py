"""Step time of a fine-tuning method against its baseline, interleaved in one run (goal: at most 1.05 each; SeND's
tracking passes are reported on their own, `send-tracking`).

    python bench/method_overhead.py                      # about 3-6 minutes on 2 CPU cores
    python bench/method_overhead.py --steps 40 --repeats 5 --json method-overhead.json

Pairs (baseline -> method), each trained through `workbench.run.train` exactly as `launch/train.py` would,
from one small base run this script pretrains first (in a temporary folder), on `synthetic:arithmetic`:
  - LoRA                 -> ALLoRA, `apply: gradient` (custom autograd Function on the adapters)
  - LoRA                 -> ALLoRA, `apply: update`   (per-row multiplier on the optimizer's update)
  - SFT (full fine-tune) -> Masked Thought            (the collator that masks completion tokens)
  - SeND tracking only   -> SeND                      (the drop alone: the forward hook zeroing 20% of the indices
                                                       of the penultimate block's output; both arms track alike)
  - SFT (full fine-tune) -> SeND tracking only        (the tracking passes: 64 texts every 10 steps)
ALLoRA's baseline is LoRA with dropout 0 (ALLoRA's own adapter shape), so the ratio is the method's cost alone.
Within a repeat the arms alternate order (A B, then B A); each arm trains `--warmup` + `--steps` steps and only
the last `--steps` are timed (wall time between consecutive `on_step_end`, batch fetch included). It prints,
per pair, the ratio of median step times with the mean +- 2 standard errors of the per-repeat ratios, and
each arm's median step time. Other processes on the same cores make every number noisy: the load average
is printed before and after. Precision is fp32 unless `--precision` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from workbench.config import load_config
from workbench.run import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_name, set_threads, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FINETUNE = REPO / "workbench" / "configs" / "finetune" / "arithmetic-lora.yaml"
TARGET_RATIO = 1.05
LORA = ["model.lora.lora_dropout=0.0"]
FULL = ["model.lora=null"]
SEND_EVERY_STEP = "{track_every: 1, window: 2, drop_intervals: 1000000, tracking_max: 4}"  # indices fixed from step 2
PAIRS: dict[str, tuple[list[str], list[str]]] = {  # name -> (baseline overrides, method overrides)
    "allora-gradient": (LORA, [*LORA, "methods={allora: {apply: gradient}}"]),
    "allora-update": (LORA, [*LORA, "methods={allora: {apply: update}}"]),
    "masked-thought": (FULL, [*FULL, "methods={masked_thought: {}}"]),
    # SeND's drop alone: both arms take the same (tiny) tracking pass every step, only the method arm drops
    "send-drop": ([*FULL, f"methods={{send: {SEND_EVERY_STEP}}}", "methods.send.selection=none"],
                  [*FULL, f"methods={{send: {SEND_EVERY_STEP}}}"]),
    # SeND's tracking passes (64 tracking texts every 10 steps), against plain training
    "send-tracking": (FULL, [*FULL, "methods={send: {selection: none, track_every: 10, tracking_max: 64}}"]),
}


class _StepClock(TrainerCallback):
    """Wall time between consecutive `on_step_end` calls after `warmup` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._last = warmup, [], None

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        now = time.perf_counter()
        if self._last is not None and state.global_step > self.warmup:
            self.times.append(now - self._last)
        self._last = now


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS), help="which pairs")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per arm and repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=4, help="A/B pairs per method (order alternates)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.steps, args.warmup, args.repeats, args.batch_size) < 1:
        parser.error("--steps, --warmup, --repeats and --batch-size must be at least 1")
    return args


def _quiet_train(cfg, callbacks):
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, callbacks=callbacks)


def pretrain_base(folder: Path, precision: str) -> Path:
    """A small pretrained run (the quickstart model, 40 steps on the fact world) to fine-tune from."""
    cfg = load_config(REPO / "workbench" / "configs" / "quickstart.yaml", [
        "name=base", f"runs_dir={folder}", "deepspeed=null", f"precision={precision}", "training.max_steps=40",
        "training.eval_strategy=no", "training.save_steps=40", "training.report_to=[]", "training.disable_tqdm=true",
        f"data.cache_dir={folder / 'cache'}"])
    _quiet_train(cfg, [])
    return folder / "base"


def time_arm(name: str, overrides: list[str], base: Path, folder: Path, args: argparse.Namespace) -> list[float]:
    """Per-step seconds of one fresh fine-tuning run."""
    cfg = load_config(FINETUNE, [
        f"name={name}", f"runs_dir={folder}", f"model.name_or_path={base}", "deepspeed=null",
        f"precision={args.precision}", f"training.max_steps={args.warmup + args.steps}",
        f"training.per_device_train_batch_size={args.batch_size}", "training.eval_strategy=no",
        "training.save_steps=100000", "training.logging_steps=100000", "training.report_to=[]",
        "training.disable_tqdm=true", "eval.on_save=false", "data.synthetic.num_problems=600",
        f"data.cache_dir={folder / 'cache'}", *overrides])
    clock = _StepClock(args.warmup)
    _quiet_train(cfg, [clock])
    return clock.times


def summarise(pair: str, repeats: list[dict[str, list[float]]]) -> dict[str, Any]:
    ratios = [statistics.median(r["method"]) / statistics.median(r["baseline"]) for r in repeats]
    base_all = [t for r in repeats for t in r["baseline"]]
    method_all = [t for r in repeats for t in r["method"]]
    spread = 2 * statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else float("nan")
    return {"pair": pair, "ratio_of_medians": statistics.median(method_all) / statistics.median(base_all),
            "mean_ratio": statistics.fmean(ratios), "two_se": spread, "per_repeat": ratios,
            "baseline_median_ms": 1e3 * statistics.median(base_all),
            "method_median_ms": 1e3 * statistics.median(method_all)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads()
    print(f"# {cpu_name()}, {threads} threads, precision {args.precision}; load average {os.getloadavg()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="method-overhead-") as tmp:
        folder = Path(tmp)
        base = pretrain_base(folder, args.precision)
        for pair in args.pairs:
            baseline, method = PAIRS[pair]
            repeats = []
            for repeat in range(args.repeats):
                order = [("baseline", baseline), ("method", method)]
                times = {}
                for arm, overrides in order if repeat % 2 == 0 else order[::-1]:
                    times[arm] = time_arm(f"{pair}-{arm}-{repeat}", overrides, base, folder, args)
                repeats.append(times)
                print(f"  {pair} repeat {repeat + 1}: ratio "
                      f"{statistics.median(times['method']) / statistics.median(times['baseline']):.3f}")
            results.append(summarise(pair, repeats))
    print(f"# load average after {os.getloadavg()}")
    print(f"{'pair':<18} {'ratio':>7} {'mean +- 2se':>16} {'baseline ms':>12} {'method ms':>10}  goal <= {TARGET_RATIO}")
    for r in results:
        verdict = "ok" if r["ratio_of_medians"] <= TARGET_RATIO else "OVER"
        print(f"{r['pair']:<18} {r['ratio_of_medians']:>7.3f} {r['mean_ratio']:>8.3f} +- {r['two_se']:<5.3f} "
              f"{r['baseline_median_ms']:>12.1f} {r['method_median_ms']:>10.1f}  {verdict}")
    write_results(args.json, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
