"""EigenScore from K sample embeddings: EES and SLQ against the exact score, time and error, in one run.

    python bench/eigenscore.py               # K in {10, 64, 256, 1024} x d in {64, 512, 4096}, two spectra
    python bench/eigenscore.py --quick       # K in {10, 64} x d in {64, 512}, one spectrum: a few seconds
    python bench/eigenscore.py --threads 1 --json eigenscore.json   # about 2 minutes
    python bench/eigenscore.py --quick --no-sweep --device cuda     # the batching comparison on a GPU

Every estimator is timed on the whole pipeline from the same (K, d) float32 embeddings to one number (centring
and any covariance or Gram matrix included, float64 inside), as the best of `--repeats` calls:
  - exact    `eigenscore`: the K×K covariance Σ, then torch.linalg.eigvalsh. The baseline of every ratio.
  - slogdet  Σ, then torch.linalg.slogdet(Σ + αI)/K.
  - exact-n  eigvalsh of the smaller Gram matrix (n = min(K, d)) plus (K − n) log α: exact, by the identity
             EES itself uses (eq. (3) of workbench/metrics/eigenscore.py), so at K > d it shows how much of
             EES's gain is that identity rather than the Chebyshev estimate.
  - EES      `efficient_eigenscore` at its defaults: degree M = ⌈2√κ⌉ in [16, 2048], N_z = 64 probes
             (the exact trace when n <= 64).
  - SLQ      `slq_logdet_mean` at its defaults: 40 Lanczos steps, the same probes.
Errors are EES − exact and SLQ − exact in nats, and relative to |exact| (meaningless where exact is near 0,
as on isotropic embeddings at K <= d). Seeds are fixed, so one run's errors are one draw of the Hutchinson
noise. Then, at the largest size, EES's and SLQ's accuracy/time trade-off over (M, N_z) and (steps, N_z),
against the goal: at least GOAL_SPEEDUP x faster than exact at most GOAL_ERROR relative error. No timed
asserts; other processes on the same cores slow every number down (the load average is printed before and
after), and several threads on shared cores can be far slower than one: try `--threads 1`.

Last, the sampling side (`workbench.metrics.hallucination.eigenscore_report`) on a small random GPT-NeoX model
(`--report-hidden` wide, 4 blocks, a 256-word vocabulary): the same `--report-prompts` prompts one per generate
call (`batch_size: 1`) and `--report-batch` per call, the time ratio one-at-a-time / batched, and the largest
difference of the per-prompt scores (each prompt is sampled from its own seed: float rounding only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_name, set_threads  # noqa: E402

from workbench.io import atomic_write_text  # noqa: E402
from workbench.metrics.eigenscore import (  # noqa: E402
    ALPHA,
    centred_factor,
    efficient_eigenscore,
    eigenscore,
    sample_covariance,
    slq_logdet_mean,
)
from workbench.metrics.hallucination import EigenScoreConfig, eigenscore_report  # noqa: E402

SAMPLES = (10, 64, 256, 1024)
FEATURES = (64, 512, 4096)
QUICK_SAMPLES, QUICK_FEATURES = (10, 64), (64, 512)
SPECTRA = ("decaying", "isotropic")
GOAL_SPEEDUP, GOAL_ERROR = 5.0, 0.02
EES_SWEEP = [(16, 8), (32, 8), (64, 8), (64, 16), (128, 16), (128, 64), (256, 64), (None, 8), (None, 64)]
SLQ_SWEEP = [(10, 8), (20, 8), (20, 16), (40, 16), (40, 64), (80, 64)]


def synthetic_embeddings(samples: int, features: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    """(K, d) float32: `decaying` has singular values falling 1000x exponentially (κ = λ_max/α about 10⁴-10⁶,
    skewed like real hidden states), `isotropic` is standard Gaussian (Marchenko-Pastur, κ about 10³)."""
    g = torch.Generator().manual_seed(seed)
    if spectrum == "isotropic":
        return torch.randn(samples, features, generator=g)
    rank = min(samples, features)
    singular = math.sqrt(features) * torch.logspace(0, -3, rank, dtype=torch.float64)
    left = torch.randn(samples, rank, generator=g, dtype=torch.float64)
    right = torch.randn(rank, features, generator=g, dtype=torch.float64) / math.sqrt(features)
    return ((left * singular) @ right).float()


def slogdet_eigenscore(embeddings: torch.Tensor) -> torch.Tensor:
    covariance = sample_covariance(embeddings)
    identity = torch.eye(covariance.shape[-1], dtype=covariance.dtype)
    return torch.linalg.slogdet(covariance + ALPHA * identity).logabsdet / covariance.shape[-1]


def smaller_side_eigenscore(embeddings: torch.Tensor) -> torch.Tensor:
    factor = centred_factor(embeddings)
    samples, features = factor.shape
    gram = factor @ factor.mT if samples <= features else factor.mT @ factor
    eigenvalues = torch.linalg.eigvalsh(gram).clamp(min=0.0)
    return (torch.log(eigenvalues + ALPHA).sum() + (samples - gram.shape[0]) * math.log(ALPHA)) / samples


def best_time(call: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float]:
    """(seconds of the fastest of `repeats` calls, the value); a call over a second runs only once."""
    times, value = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = float(call())
        times.append(time.perf_counter() - start)
        if times[-1] > 1.0:
            break
    return min(times), value


def measure(values: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Time and value of each estimator on one (K, d) input; the arms alternate within each repeat."""
    arms = {"exact": lambda: eigenscore(values), "slogdet": lambda: slogdet_eigenscore(values),
            "exact_n": lambda: smaller_side_eigenscore(values), "ees": lambda: efficient_eigenscore(values),
            "slq": lambda: slq_logdet_mean(values)}
    moments = ees_degree(values)  # also EES's warm-up; the others':
    for name, call in arms.items():
        if name != "ees":
            call()
    results: dict[str, list[float]] = {name: [] for name in arms}
    outputs: dict[str, float] = {}
    for _ in range(repeats):
        for name, call in arms.items():
            if results[name] and results[name][0] > 1.0:
                continue  # a call over a second is timed once
            seconds, outputs[name] = best_time(call, 1)
            results[name].append(seconds)
    row = {"K": values.shape[0], "d": values.shape[1], **{f"{n}_s": min(t) for n, t in results.items()}}
    row.update({f"{n}_value": v for n, v in outputs.items()})
    row["moments"] = moments
    return row


def ees_degree(values: torch.Tensor) -> int:
    """One untimed EES call, returning the degree its adaptive rule picked."""
    from workbench.metrics import eigenscore as module

    picked: list[int] = []
    original = module._padded_coefficients

    def spy(upper: torch.Tensor, alpha: float, degrees: torch.Tensor) -> torch.Tensor:
        picked.append(int(degrees.max()))
        return original(upper, alpha, degrees)

    module._padded_coefficients = spy
    try:
        efficient_eigenscore(values)
    finally:
        module._padded_coefficients = original
    return picked[-1]


def errors(row: dict[str, Any], name: str) -> tuple[float, float]:
    error = row[f"{name}_value"] - row["exact_value"]
    return error, abs(error) / max(abs(row["exact_value"]), 1e-12)


def print_table(spectrum: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {spectrum} embeddings: milliseconds (best of the repeats), speed ratio exact/EES, "
          "errors vs exact")
    print(f"{'K':>5} {'d':>5} {'exact':>9} {'slogdet':>9} {'exact-n':>9} {'EES':>9} {'SLQ':>9} "
          f"{'exact/EES':>9} {'M':>5} {'exact ES':>9} {'EES err (rel)':>19} {'SLQ err (rel)':>19}")
    for r in rows:
        ees_error, ees_relative = errors(r, "ees")
        slq_error, slq_relative = errors(r, "slq")
        print(f"{r['K']:>5} {r['d']:>5} {1e3 * r['exact_s']:>9.3f} {1e3 * r['slogdet_s']:>9.3f} "
              f"{1e3 * r['exact_n_s']:>9.3f} {1e3 * r['ees_s']:>9.3f} {1e3 * r['slq_s']:>9.3f} "
              f"{r['exact_s'] / r['ees_s']:>9.2f} {r['moments']:>5} {r['exact_value']:>9.4f} "
              f"{ees_error:>+9.4f} ({100 * ees_relative:>6.2f}%) "
              f"{slq_error:>+9.4f} ({100 * slq_relative:>6.2f}%)")
    consistency = max(abs(r[f"{n}_value"] - r["exact_value"]) for r in rows for n in ("slogdet", "exact_n"))
    print(f"(slogdet and exact-n agree with exact to {consistency:.1e} nats)")


def print_verdict(spectrum: str, rows: list[dict[str, Any]]) -> None:
    best_exact = {id(r): min(r["exact_s"], r["slogdet_s"], r["exact_n_s"]) for r in rows}
    faster = [f"{r['K']}x{r['d']}" for r in rows if r["ees_s"] < r["exact_s"]]
    faster_than_all = [f"{r['K']}x{r['d']}" for r in rows if r["ees_s"] < best_exact[id(r)]]
    print(f"{spectrum}: EES faster than exact (eigvalsh of Σ) at K x d = {', '.join(faster) or 'none'}; "
          "faster than the best exact route (eigvalsh, slogdet or exact-n) at "
          f"{', '.join(faster_than_all) or 'none'}.")
    for r in rows:
        if r["K"] == min(row["K"] for row in rows) and r["d"] == min(row["d"] for row in rows):
            winner = "exact is faster" if r["exact_s"] < r["ees_s"] else "EES is faster"
            print(f"  At K = {r['K']}, d = {r['d']} exact takes {1e6 * r['exact_s']:.0f} us and EES "
                  f"{1e6 * r['ees_s']:.0f} us: {winner}.")


def sweep(values: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    """EES over (M, N_z) and SLQ over (steps, N_z) on one input, each with its time, ratio and error."""
    exact_s, exact_value = best_time(lambda: eigenscore(values), repeats)
    rows = []
    for moments, probes in EES_SWEEP:
        seconds, value = best_time(
            lambda m=moments, p=probes: efficient_eigenscore(values, moments=m, probes=p), repeats)
        rows.append({"estimator": "EES", "setting": f"M={moments or 'adaptive'}, N_z={probes}", "s": seconds,
                     "value": value})
    for steps, probes in SLQ_SWEEP:
        seconds, value = best_time(lambda m=steps, p=probes: slq_logdet_mean(values, steps=m, probes=p),
                                   repeats)
        rows.append({"estimator": "SLQ", "setting": f"steps={steps}, N_z={probes}", "s": seconds,
                     "value": value})
    for r in rows:
        r.update(exact_s=exact_s, exact_value=exact_value, speedup=exact_s / r["s"],
                 relative_error=abs(r["value"] - exact_value) / abs(exact_value))
    return rows


def print_sweep(spectrum: str, shape: tuple[int, int], rows: list[dict[str, Any]]) -> None:
    print(f"\n## trade-off at K = {shape[0]}, d = {shape[1]}, {spectrum}: "
          f"exact {1e3 * rows[0]['exact_s']:.1f} ms, ES = {rows[0]['exact_value']:.4f}; "
          f"goal >= {GOAL_SPEEDUP:g}x faster at <= {100 * GOAL_ERROR:g}% error")
    print(f"{'estimator':<9} {'setting':<22} {'ms':>9} {'exact/est':>9} {'error':>9} {'rel':>7}  goal")
    for r in rows:
        met = r["speedup"] >= GOAL_SPEEDUP and r["relative_error"] <= GOAL_ERROR
        print(f"{r['estimator']:<9} {r['setting']:<22} {1e3 * r['s']:>9.2f} {r['speedup']:>9.2f} "
              f"{r['value'] - r['exact_value']:>+9.4f} {100 * r['relative_error']:>6.2f}%  "
              f"{'met' if met else '-'}")


REPORT_WORDS = 256  # the word-level vocabulary of the batching comparison's model


def report_model(hidden: int, device: str) -> tuple[torch.nn.Module, Any]:
    """A random 4-block GPT-NeoX over REPORT_WORDS words (plus <pad>, <eos>) and its word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(REPORT_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=4 * hidden, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return GPTNeoXForCausalLM(config).to(device).eval(), tokenizer


def report_prompts(count: int) -> list[str]:
    """`count` prompts of 3 to 12 words, fixed by a seed."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 13, (count,), generator=g).tolist()
    return [" ".join(f"w{int(w)}" for w in torch.randint(0, REPORT_WORDS, (n,), generator=g)) for n in lengths]


def measure_batching(prompts: int, batch_size: int, hidden: int, device: str, repeats: int) -> dict[str, Any]:
    """eigenscore_report one prompt per generate call against `batch_size` per call: best times, ratio, the
    largest per-prompt score difference."""
    model, tokenizer = report_model(hidden, device)
    texts = report_prompts(prompts)
    options = {"samples": 10, "max_new_tokens": 16, "temperature": 1.0}
    arms = {"one_at_a_time": EigenScoreConfig(**options, batch_size=1),
            "batched": EigenScoreConfig(**options, batch_size=batch_size)}
    eigenscore_report(model, tokenizer, texts[:1], arms["batched"])  # warm-up
    seconds: dict[str, float] = {}
    items: dict[str, dict[str, list[float]]] = {}
    for name, config in arms.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            items[name] = eigenscore_report(model, tokenizer, texts, config)["items"]
            times.append(time.perf_counter() - started)
        seconds[name] = min(times)
    difference = max(abs(a - b) for name in ("ees", "eigenscore") for a, b in
                     zip(items["one_at_a_time"][name], items["batched"][name], strict=True))
    return {"prompts": prompts, "batch_size": batch_size, "hidden": hidden, "device": device,
            **{f"{name}_s": value for name, value in seconds.items()},
            "ratio": seconds["one_at_a_time"] / seconds["batched"], "max_score_difference": difference}


def print_batching(row: dict[str, Any]) -> None:
    print(f"\n## eigenscore_report, {row['prompts']} prompts x K = 10 samples, hidden {row['hidden']}, "
          f"{row['device']}: one prompt per generate call {row['one_at_a_time_s']:.2f} s, {row['batch_size']} "
          f"per call {row['batched_s']:.2f} s: one-at-a-time / batched = {row['ratio']:.2f}x; "
          f"largest score difference {row['max_score_difference']:.1e} nats")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one spectrum: a few seconds")
    parser.add_argument("--spectra", nargs="+", choices=SPECTRA, default=None, help="which embeddings")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per estimator and size (best)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core we may use)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the trade-off sweep at the top size")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write results as JSON")
    parser.add_argument("--report-prompts", type=int, default=16, help="prompts of the batching comparison")
    parser.add_argument("--report-batch", type=int, default=8, help="prompts per generate call when batched")
    parser.add_argument("--report-hidden", type=int, default=256, help="width of the comparison's model")
    parser.add_argument("--device", default="cpu", help="device of the batching comparison (cpu, cuda)")
    parser.add_argument("--no-report", action="store_true", help="skip the batching comparison")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 0:
        parser.error("--repeats must be at least 1 and --threads at least 0")
    if args.report_prompts < 1 or args.report_batch < 1 or args.report_hidden < 4:
        parser.error("--report-prompts and --report-batch must be at least 1, --report-hidden at least 4")
    if args.spectra is None:
        args.spectra = list(SPECTRA[:1] if args.quick else SPECTRA)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads() if args.threads == 0 else args.threads
    torch.set_num_threads(threads)
    samples, features = (QUICK_SAMPLES, QUICK_FEATURES) if args.quick else (SAMPLES, FEATURES)
    print(f"# {cpu_name()}, {threads} threads, torch {torch.__version__}, float64 inside, alpha = {ALPHA}; "
          f"load average {os.getloadavg()}")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "tables": {}, "sweeps": {}}
    for spectrum in args.spectra:
        rows = [measure(synthetic_embeddings(k, d, spectrum), args.repeats)
                for k in samples for d in features]
        results["tables"][spectrum] = rows
        print_table(spectrum, rows)
        print_verdict(spectrum, rows)
    if not args.no_sweep:
        shape = (max(samples), max(features))
        for spectrum in args.spectra:
            rows = sweep(synthetic_embeddings(*shape, spectrum), args.repeats)
            results["sweeps"][spectrum] = rows
            print_sweep(spectrum, shape, rows)
    if not args.no_report:
        results["batching"] = measure_batching(args.report_prompts, args.report_batch, args.report_hidden,
                                               args.device, args.repeats)
        print_batching(results["batching"])
    ratios = [r["exact_s"] / r["ees_s"] for table in results["tables"].values() for r in table]
    print(f"\n# load average after {os.getloadavg()}; median exact/EES over all sizes "
          f"{statistics.median(ratios):.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
