"""Training-step time of SinKD against plain KD (KL), interleaved in one run (goal: SinKD at most 1.2x on
classification; causal LMs are reported, not judged).

    python bench/distill_step.py                 # about 5-10 minutes on 2 CPU cores
    python bench/distill_step.py --quick         # about 1 minute: the classification rows and V = 8k
    python bench/distill_step.py --vocab 32768 --tokens 2048 --steps 3 --threads 1 --json distill-step.json

A step is forward + loss + backward + AdamW step of a small student against a frozen teacher's logits (computed
once, before timing, and the same for both arms, so the ratio is the cost of the loss alone over a student step):
  - classification: N = 32 samples, an MLP student (768 -> 768 -> C) for each C of `--classes`;
    KL arm (1 - a)·CE + a·KL_t, SinKD arm + b·N·<P, W> (batch-wise Sinkhorn over the 32 samples);
  - causal LM: a tiny GPT-NeoX student (hidden 64, 2 layers) with vocabulary V, batches of T tokens in
    sequences of `--seq-len` (the first quarter of each a prompt outside the loss); KL arm per token, SinKD arm
    + the per-sequence Sinkhorn over each sequence's completion tokens (full vocabulary), and the same with the
    authors' top-50 vocabulary truncation (`top_k: 50`).
Both arms use `workbench.losses.distillation_loss` with the method's defaults (a = 0.9, t = t_S = 2, e = 0.1,
20 iterations, b = 8e-4; b = 0 in the KL arm). Each arm has its own student (same initial weights); after
`--warmup` untimed steps each, the arms' steps interleave one by one for `--cls-steps` (classification) or `--steps`
(causal LM) rounds, the order rotating every round; the table shows median step times and their ratio.

Peak memory: the resident-set high-water mark during one extra untimed step, minus the resident size at its
start (`/proc/self/clear_refs` resets the mark; glibc's mmap threshold is pinned at 128 KiB so freed tensors
leave the resident set). "step" counts what a whole step allocates (activations, logits, gradients, the loss's
temporaries), not the weights, optimizer state or teacher logits that exist before it; "loss" the loss's forward
and backward alone, from detached student logits (the loss's own memory, which can stay under the step's peak).
Linux only; other platforms print n/a. Other processes on the same cores make the times noisy: the load average
is printed (`--threads 1` avoids the thread-pool stalls two threads suffer on busy cores).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from workbench.losses import causal_lm_mask, distillation_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_name, set_threads, write_results  # noqa: E402

TARGET_RATIO = 1.2  # classification only
BATCH = 32
FEATURES = 768
STATUS = Path("/proc/self/status")


# ----------------------------------------------------------------------------------------------------------
# Peak memory: the resident set's high-water mark over one step
# ----------------------------------------------------------------------------------------------------------


def pin_malloc() -> bool:
    """Large allocations through mmap (returned to the OS when freed), so the resident size tracks live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024)) and bool(libc.mallopt(-1, 128 * 1024))  # MMAP_, TRIM_THRESHOLD
    except OSError:
        return False


def _status_mib(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", STATUS.read_text()).group(1)) / 1024


def peak_mib(step: Callable[[], None]) -> float | None:
    """MiB the resident set grows to during `step`, above its size at the start; None where unmeasurable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        start = _status_mib("VmRSS")
    except (OSError, AttributeError):
        step()
        return None
    step()
    return _status_mib("VmHWM") - start


# ----------------------------------------------------------------------------------------------------------
# The two tasks: a step function per arm
# ----------------------------------------------------------------------------------------------------------


def make_step(model: torch.nn.Module, forward: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              teacher_logits: torch.Tensor, mask: torch.Tensor | None,
              options: dict[str, Any]) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step, and the loss alone (forward and backward from the student's logits, detached)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, ce = forward()
        loss, _ = distillation_loss(logits, teacher_logits, ce, mask=mask, **options)
        loss.backward()
        optimizer.step()

    def loss_only() -> None:
        with torch.no_grad():
            logits, ce = forward()
        logits.requires_grad_()
        distillation_loss(logits, teacher_logits, ce, mask=mask, **options)[0].backward()

    return step, loss_only


def classification_case(classes: int, seed: int = 0) -> tuple[torch.nn.Module, Callable, torch.Tensor, None]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(FEATURES, FEATURES), torch.nn.GELU(),
                                  torch.nn.Linear(FEATURES, classes))
    features = torch.randn(BATCH, FEATURES, generator=generator)
    labels = torch.randint(0, classes, (BATCH,), generator=generator)
    teacher_logits = torch.randn(BATCH, classes, generator=generator) * 2

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        logits = student(features)
        return logits, torch.nn.functional.cross_entropy(logits, labels)

    return student, forward, teacher_logits, None


def causal_lm_case(vocab: int, tokens: int, seq_len: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=seq_len)
    student = GPTNeoXForCausalLM(config).train()
    rows = max(1, tokens // seq_len)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # the prompt
    teacher_logits = torch.randn(rows, seq_len, vocab, generator=generator) * 2

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out = student(input_ids=ids, labels=labels, use_cache=False)
        return out.logits, out.loss

    return student, forward, teacher_logits, causal_lm_mask(labels)


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def time_arms(build: Callable[[], tuple], arms: dict[str, dict[str, Any]], rounds: int,
              args: argparse.Namespace) -> dict[str, Any]:
    """Median step seconds and peak MiB per arm. One student per arm (same initial weights), one batch and teacher
    logits for all; the arms' steps interleave one by one for `rounds` rounds (the order rotating), so a change in
    the load from other processes reaches every arm alike."""
    steps, losses = {}, {}
    for name, options in arms.items():
        model, forward, teacher_logits, mask = build()
        steps[name], losses[name] = make_step(model, forward, teacher_logits, mask, options)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    peaks = {name: peak_mib(step) for name, step in steps.items()}
    loss_peaks = {name: peak_mib(loss) for name, loss in losses.items()}
    return {name: {"median_ms": 1e3 * statistics.median(values), "peak_mib": peaks[name],
                   "loss_peak_mib": loss_peaks[name]} for name, values in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="*", default=[2, 3, 10], help="classification: C values")
    parser.add_argument("--vocab", type=int, nargs="*", default=[8192, 16384, 32768], help="causal LM: V values")
    parser.add_argument("--tokens", type=int, nargs="*", default=[256, 1024, 2048], help="causal LM: tokens per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="causal LM: tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="causal LM: timed steps per arm")
    parser.add_argument("--cls-steps", type=int, default=60, help="classification: timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm before them")
    parser.add_argument("--quick", action="store_true",
                        help="V = 8k at 256/1024 tokens, 3 LM steps, 30 classification steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.steps, args.cls_steps = [8192], [256, 1024], 3, 30
    if min(args.steps, args.cls_steps, args.seq_len) < 1 or args.warmup < 0:
        parser.error("--steps, --cls-steps and --seq-len must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    pinned = pin_malloc()
    print(f"# {cpu_name()}, {threads} threads, torch {torch.__version__}; load average {os.getloadavg()}")
    print(f"# peak memory: resident-set high-water mark over one step, above its start (MiB; malloc pinned: {pinned})")
    kl = {"kd": "kl", "beta": 0.0}
    sinkd = {"kd": "kl", "beta": 8e-4}
    rows = []
    for classes in args.classes:
        result = time_arms(lambda c=classes: classification_case(c), {"kl": kl, "sinkd": sinkd}, args.cls_steps, args)
        rows.append({"task": "classification", "size": f"N={BATCH} C={classes}", **result})
        print(f"  classification C={classes}: ratio {result['sinkd']['median_ms'] / result['kl']['median_ms']:.3f}",
              flush=True)
    for vocab in args.vocab:
        for tokens in args.tokens:
            arms = {"kl": kl, "sinkd": sinkd, "sinkd_top50": {**sinkd, "top_k": 50}}
            result = time_arms(lambda v=vocab, t=tokens: causal_lm_case(v, t, args.seq_len), arms, args.steps, args)
            rows.append({"task": "causal-lm", "size": f"V={vocab} T={tokens}", **result})
            print(f"  causal LM V={vocab} T={tokens}: ratio "
                  f"{result['sinkd']['median_ms'] / result['kl']['median_ms']:.3f}", flush=True)
    print(f"# load average after {os.getloadavg()}")

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    print(f"{'task':<15} {'size':<16} {'KL ms':>8} {'SinKD ms':>9} {'ratio':>6} {'top50 ms':>9} {'ratio':>6} "
          f"{'step MiB KL/SinKD/top50':>24} {'loss MiB KL/SinKD/top50':>24}  goal")
    for row in rows:
        base, method, top = row["kl"], row["sinkd"], row.get("sinkd_top50")
        ratio = method["median_ms"] / base["median_ms"]
        verdict = (("ok" if ratio <= TARGET_RATIO else "OVER") + f" (<= {TARGET_RATIO})"
                   if row["task"] == "classification" else "-")
        blank = f"{'':>9} {'':>6}"
        top_ms = f"{top['median_ms']:>9.1f} {top['median_ms'] / base['median_ms']:>6.2f}" if top else blank
        arms = [base, method] + ([top] if top else [])
        step_mib = "/".join(mib(arm["peak_mib"]) for arm in arms)
        loss_mib = "/".join(mib(arm["loss_peak_mib"]) for arm in arms)
        print(f"{row['task']:<15} {row['size']:<16} {base['median_ms']:>8.1f} {method['median_ms']:>9.1f} "
              f"{ratio:>6.2f} {top_ms} {step_mib:>24} {loss_mib:>24}  {verdict}")
    write_results(args.json, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
