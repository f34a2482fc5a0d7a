"""Shared pieces of the reproductions: launching training runs, log-spaced steps, seed tables."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from workbench.warm import train_process, warm_process

REPO = Path(__file__).resolve().parents[2]


def log_spaced_steps(first: int, last: int, count: int) -> list[int]:
    """`count` distinct integer steps from `first` to `last`, evenly spaced in log(step)."""
    steps = sorted({int(round(s)) for s in np.geomspace(first, last, count)})
    if len(steps) < count:  # rounding merged neighbouring small steps: start later or ask for fewer
        raise ValueError(f"cannot place {count} distinct log-spaced steps between {first} and {last}")
    return steps


def train(config: Path, overrides: list[str], log: Path, threads: int | None = None) -> None:
    """`python launch/train.py config --set ... --overwrite` (forked from a warm server, `workbench.warm`) with
    `threads` torch threads; raises with the log's tail on failure."""
    args = [str(config), "--overwrite", *[arg for override in overrides for arg in ("--set", override)]]
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if train_process(args, log, threads, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}) != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"training failed (launch/train.py {' '.join(args)}), see {log}:\n{tail}")


def train_all(jobs: list[tuple[Path, list[str], Path]], parallel: int = 2) -> None:
    """`train` each (config, overrides, log) of `jobs`, `parallel` at a time with the cores shared out."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(train, *job, threads) for job in jobs]:
            future.result()


def evaluate_all(jobs: list[tuple], limit: int, parallel: int = 2) -> None:
    """`workbench_eval.sweep.sweep` each (target, eval config) of `jobs` (cached cells are skipped), `parallel` at a time in
    processes forked from the warm server, the cores shared out; progress goes to `<results>.log` beside each
    target's results."""
    from workbench_eval.sweep import sweep

    threads = max(1, (os.cpu_count() or 1) // parallel)

    def one(target, cfg) -> None:
        log = target.results.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        if warm_process(sweep, (target, cfg, limit), log, threads) != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"evaluating {target.name} failed, see {log}:\n{tail}")

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(one, *job) for job in jobs]:
            future.result()


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def fmt_ms(values: list[float]) -> str:
    mean, std = mean_std(values)
    return "–" if math.isnan(mean) else f"{mean:+.2f} ± {std:.2f}"


def prompt_lengths(run: Path, cfg, limit: int) -> dict[tuple[str, str], list[int]]:
    """(task, style) -> the token count of each request's full text (prompt and, for scored options, the option)
    as the run's tokenizer splits it: what must fit in the model's context."""
    from transformers import AutoTokenizer

    from workbench_eval.evaluator import Evaluator
    from workbench_eval.sweep import run_target

    target = run_target(run)
    tokenizer = AutoTokenizer.from_pretrained(target.tokenizer)
    evaluator = Evaluator(cfg, tokenizer, target.world, limit)
    lengths: dict[tuple[str, str], list[int]] = {}
    for key, task in evaluator.tasks.items():
        texts = [inst.args[0] + (inst.args[1] if isinstance(inst.args[1], str) else "") for inst in task.instances]
        lengths[key] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths
