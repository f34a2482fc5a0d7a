"""Timing helpers for the benchmarks: the machine, matmul rates, and a per-step phase timer for `Trainer`s."""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from workbench.precision import matmul_gflops

PEAK_N = 2048  # the peak is the rate of an n x n @ n x n matmul of this size


def set_threads(requested: int | None = None) -> int:
    """Use `requested` threads, or every core this process may run on; returns the thread count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(requested or cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))  # else accelerate picks its own count for DeepSpeed
    return torch.get_num_threads()


def write_results(path: Path | None, args: Any, results: Any) -> None:
    """With `--json OUT`: the run's arguments and results as JSON in OUT, written atomically."""
    if path is None:
        return
    import json

    from workbench.io import atomic_write_text

    atomic_write_text(path, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_matmuls(mlp_shape: tuple[int, int, int], seconds: float) -> dict[str, float]:
    """GFLOP/s of the peak matmul and of the model's MLP up-projection (tokens x d @ d x ffn), fp32 and bf16."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates[name] = matmul_gflops(PEAK_N, dtype, device(), min_seconds=seconds)
        rates[f"mlp_{name}"] = matmul_gflops(0, dtype, device(), min_seconds=seconds, shape=mlp_shape)
    return rates


def best_rates(samples: list[dict[str, float]]) -> dict[str, float]:
    """Each rate's best measurement: other processes on the cores only ever slow a matmul down."""
    return {key: max(sample[key] for sample in samples) for key in samples[0]}



class StepTimer(TrainerCallback):
    """Per-step wall times and their phases; each hook costs one perf_counter call."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[dict[str, float]] = []
        self.tokens: list[int] = []
        self.threads = 0
        self.startup_s = 0.0
        self.optimizer_hook = ""
        self._trainer: Any = None
        self._marks: dict[str, float] = {}
        self._last_end: float | None = None
        self._train_called = 0.0

    def attach(self, trainer: Any) -> None:
        self._trainer = trainer
        trainer.model.register_forward_pre_hook(self._forward_begin, with_kwargs=True)
        trainer.model.register_forward_hook(self._forward_end)
        self._train_called = time.perf_counter()

    def _forward_begin(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self._marks["forward_begin"] = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens.append(int(ids.numel()))

    def _forward_end(self, module: Any, args: Any, output: Any) -> None:
        self._marks["forward_end"] = time.perf_counter()

    def _timed(self, step: Any) -> Any:
        @functools.wraps(step)  # keeps the marks the lr scheduler puts on optimizer.step
        def timed_step(*args: Any, **kwargs: Any) -> Any:
            self._marks["optimizer_begin"] = time.perf_counter()
            result = step(*args, **kwargs)
            self._marks["optimizer_end"] = time.perf_counter()
            return result

        return timed_step

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        trainer = self._trainer
        # Under DeepSpeed the optimizer step (with grad clipping and ZeRO's work) runs inside the engine's
        # `step`, called from accelerate's backward; the trainer's own optimizer.step() is then a no-op.
        if trainer.is_deepspeed_enabled:
            target, self.optimizer_hook = trainer.model_wrapped, "DeepSpeed engine.step (clip + ZeRO + AdamW)"
        else:
            target, self.optimizer_hook = trainer.optimizer, "optimizer.step (grad clipping counts as backward)"
        target.step = self._timed(target.step)
        self.threads = torch.get_num_threads()

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        now = time.perf_counter()
        if self._last_end is None:
            self.startup_s = now - self._train_called
        self._marks = {"begin": now}

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        now = time.perf_counter()
        if state.global_step > self.warmup and self._last_end is not None:
            self.steps.append(self._phases(now))
        self._last_end = now

    def _phases(self, end: float) -> dict[str, float]:
        m, last = self._marks, self._last_end
        times = {"step": end - last, "between": m["begin"] - last}
        if {"forward_begin", "forward_end", "optimizer_begin", "optimizer_end"} <= m.keys():
            times["forward"] = m["forward_end"] - m["forward_begin"]
            times["backward"] = m["optimizer_begin"] - m["forward_end"]
            times["optimizer"] = m["optimizer_end"] - m["optimizer_begin"]
            times["in_step_other"] = (m["forward_begin"] - m["begin"]) + (end - m["optimizer_end"])
        return times

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self._trainer = None
