"""Tokens per second of SMoE-Dropout's MoE MLP at k = 1, E/4, E/2, E against the dense MLP it replaces, in one run.

    python bench/smoe_throughput.py --threads 1     # about 5 minutes on one core
    python bench/smoe_throughput.py --quick         # about a minute: fewer sizes, tokens and repeats
    python bench/smoe_throughput.py --sizes 512x4096x16 1024x4096x16 --tokens 8192

One MLP layer per size (d_model x d_ff, E experts of width d_ff/E; the MoE layer has the dense layer's
parameters plus an E x d_model router), GELU, fp32, random frozen router N(0, 0.02) on N(0, 1) inputs. Two
modes, each timed per pass (fastest of `--calls` calls of >= 50 ms each), interleaved arm by arm within every repeat (the order reverses
on odd repeats), median over repeats:
  - inference: eval mode, no_grad, forward only (`eval_k` = k);
  - training: train mode, forward + backward to the inputs and weights (no optimizer step: AdamW updates every
    expert whatever k is, so it costs the same in both arms and is left out).
k < E runs the sparse path (tokens sorted by expert, one matmul pair per expert on its tokens, `index_add_`);
k = E runs every expert on every token as one dense matmul (nothing to skip). The dense arm is a plain
nn.Linear -> GELU -> nn.Linear. Ratios are MoE tokens/s over dense tokens/s of the same size and mode (> 1:
faster), from the medians over repeats. No timed asserts: the table is the result. The default schedule's FLOPs
saving is computed from the schedule itself (mean k / E over the steps), not measured.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import cpu_name, set_threads  # noqa: E402

from workbench.methods.smoe_dropout import SMoEDropoutConfig, scheduled_k  # noqa: E402
from workbench.models.moe import MoEMLP  # noqa: E402
from workbench.models.moe_model import mean_active_fraction  # noqa: E402

SIZES = ["32x128x16", "64x256x16", "128x512x16", "256x1024x16", "256x2048x16", "512x2048x16", "512x4096x16",
         "1024x4096x16"]
QUICK_SIZES = ["64x256x16", "256x2048x16", "512x4096x16"]
TARGET = ("512x4096x16", 1.5)  # goal: k = E/4 at least 1.5x dense throughput at this size


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        d_model, d_ff, experts = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size '{text}' is not d_model x d_ff x E, e.g. 512x4096x16") from None
    if d_ff % experts:
        raise argparse.ArgumentTypeError(f"size '{text}': E = {experts} does not divide d_ff = {d_ff}")
    return d_model, d_ff, experts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="DxFxE",
                        help=f"d_model x d_ff x experts (default: {' '.join(SIZES)})")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per call (batch x sequence)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every core; 1 is steadier on cores other processes share)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per arm and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median over them)")
    parser.add_argument("--quick", action="store_true", help="3 sizes, 1024 tokens, 2 calls, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [parse_size(s) for s in QUICK_SIZES]
        args.tokens, args.calls, args.repeats = min(args.tokens, 1024), 2, 2
    args.sizes = args.sizes or [parse_size(s) for s in SIZES]
    if min(args.tokens, args.calls, args.repeats) < 1:
        parser.error("--tokens, --calls and --repeats must be at least 1")
    return args


def ks_for(experts: int) -> list[int]:
    return sorted({1, max(1, experts // 4), max(1, experts // 2), experts})


def build(d_model: int, d_ff: int, experts: int) -> tuple[nn.Module, MoEMLP]:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
    moe = MoEMLP(d_model, d_ff, experts, nn.GELU())
    moe.init_scratch(0.02)
    moe.init_router("normal", 0.02)
    return dense, moe


def _once(module: nn.Module, x: torch.Tensor, training: bool) -> None:
    if training:
        inputs = x.detach().requires_grad_(True)
        module(inputs).sum().backward()
        module.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            module(x)


def time_calls(module: nn.Module, x: torch.Tensor, training: bool, calls: int, min_seconds: float = 0.05) -> float:
    """Fastest seconds per pass over `calls` timed calls, each of enough passes to last `min_seconds` (calibrated
    by an untimed warm-up pass): other processes only ever slow a call down."""
    start = time.perf_counter()
    _once(module, x, training)
    passes = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        for _ in range(passes):
            _once(module, x, training)
        times.append((time.perf_counter() - start) / passes)
    return min(times)


def measure(size: tuple[int, int, int], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """tokens/s per mode and arm ('dense', 'k=1', ...)."""
    d_model, d_ff, experts = size
    dense, moe = build(*size)
    x = torch.randn(args.tokens, d_model)
    arms = ["dense", *(f"k={k}" for k in ks_for(experts))]
    results: dict[str, dict[str, float]] = {}
    for mode in ("inference", "training"):
        training = mode == "training"
        dense.train(training)
        moe.train(training)
        seconds: dict[str, list[float]] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            for arm in arms if repeat % 2 == 0 else arms[::-1]:
                if arm == "dense":
                    seconds[arm].append(time_calls(dense, x, training, args.calls))
                    continue
                k = int(arm[2:])
                moe.k, moe.eval_k = k, k
                seconds[arm].append(time_calls(moe, x, training, args.calls))
        results[mode] = {arm: args.tokens / statistics.median(s) for arm, s in seconds.items()}
    return results


def crossover(label: str, ratios: list[tuple[tuple[int, int, int], float]]) -> str:
    """Where k = `label` stops losing to dense, sizes ordered by d_model x d_ff."""
    name = "x".join
    losing = [s for s, r in ratios if r < 1.0]
    winning = [s for s, r in ratios if r >= 1.0]
    if not winning:
        return f"k = {label}: slower than dense at every size measured (routing overhead eats the gain)"
    if not losing:
        return f"k = {label}: faster than dense at every size measured (crossover below the smallest)"
    below = max(losing, key=lambda s: s[0] * s[1])
    above = min((s for s in winning if s[0] * s[1] > below[0] * below[1]), key=lambda s: s[0] * s[1], default=None)
    tail = f", faster from {name(map(str, above))} upward" if above else ", and at no larger size"
    return f"k = {label}: slower than dense up to {name(map(str, below))} (routing overhead eats the gain){tail}"


def schedule_savings(experts: int = 16, steps: int = 10_000) -> list[tuple[str, float]]:
    """Mean k/E of the schedules (analytic: k(t) over every step), for the default and the 2 -> E arm."""
    rows = []
    for label, k_min in ((f"linear {experts // 2} -> {experts} (default)", experts // 2), (f"linear 2 -> {experts}", 2)):
        cfg = SMoEDropoutConfig(experts=experts, k_min=k_min)
        ks = [scheduled_k(t, steps, cfg.mode, cfg.k_lo, cfg.k_hi, experts) for t in range(steps)]
        rows.append((label, mean_active_fraction(ks, experts)))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    print(f"# {cpu_name()}, {threads} threads, fp32, {args.tokens} tokens per call, {args.calls} calls x "
          f"{args.repeats} repeats (interleaved); load average {os.getloadavg()}")
    if threads > 1 and os.getloadavg()[0] > 1:
        print("# other processes are running: multi-threaded matmuls then wait on descheduled threads and the "
              "ratios scatter; --threads 1 gives steadier ones")
    all_results = {}
    for size in args.sizes:
        all_results[size] = measure(size, args)
        print(f"  measured {size[0]}x{size[1]}x{size[2]}", flush=True)
    print(f"# load average after {os.getloadavg()}")
    for mode in ("inference", "training"):
        print(f"\n{mode}: MoE tokens/s over dense tokens/s of the same size (> 1: faster); dense in k tokens/s")
        header = f"{'d_model x d_ff x E':>20} {'dense ktok/s':>13} {'k=1':>7} {'k=E/4':>7} {'k=E/2':>7} {'k=E':>7}"
        print(header)
        for size, results in all_results.items():
            row = results[mode]
            e = size[2]
            ratios = [row[f"k={k}"] / row["dense"] for k in (1, max(1, e // 4), max(1, e // 2), e)]
            print(f"{'x'.join(map(str, size)):>20} {row['dense'] / 1e3:>13.1f} " + " ".join(f"{r:>7.2f}" for r in ratios))
        for label, divisor in (("E/4", 4), ("E/2", 2)):
            print("  " + crossover(label, [(size, res[mode][f"k={max(1, size[2] // divisor)}"] / res[mode]["dense"])
                                           for size, res in all_results.items()]))
        target = parse_size(TARGET[0])
        if target in all_results:
            ratio = all_results[target][mode][f"k={target[2] // 4}"] / all_results[target][mode]["dense"]
            print(f"  goal {TARGET[0]}, k = E/4: >= {TARGET[1]}x dense; measured {ratio:.2f}x "
                  f"({'met' if ratio >= TARGET[1] else 'NOT met'})")
    print("\nMLP FLOPs of a training run under the k schedule (analytic: mean over steps of k(t)/E; router and "
          "scatter aside)")
    for label, fraction in schedule_savings():
        print(f"  {label:<28} mean k/E = {fraction:.3f}: {100 * fraction:.1f}% of the dense MLP's FLOPs, "
              f"saving {100 * (1 - fraction):.1f}%")
    d_model, d_ff, experts = parse_size(TARGET[0])
    print(f"  router: {experts} x {d_model} per token = {100 * experts / (2 * d_ff):.2f}% of the dense MLP's "
          f"matmul FLOPs at {TARGET[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
