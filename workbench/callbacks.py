"""Trainer callbacks, each usable alone in anyone's `Trainer`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from workbench.io import append_jsonl, atomic_write_text, read_jsonl

__all__ = ["MetricsJsonlCallback", "SaveAtStepsCallback"]


class MetricsJsonlCallback(TrainerCallback):
    """One JSON line per logging step (`step`, `epoch` and everything logged) in `path`, from rank 0.

    On resume, lines from steps after the resumed checkpoint (which will be trained again) are dropped,
    so the file always describes one run. An evaluation that repeats the previous one (same step, same
    metrics; only its timings differ), such as a final `evaluate()` right after the last in-training
    evaluation, is not written again.
    """

    TIMINGS = ("_runtime", "_per_second")  # suffixes of logged keys that differ between identical evaluations

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._last_eval: tuple[int, dict[str, Any]] | None = None

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.path.is_file():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= state.global_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        measured = {k: v for k, v in logs.items() if k.startswith("eval_") and not k.endswith(self.TIMINGS)}
        if measured:
            if self._last_eval == (state.global_step, measured):
                return
            self._last_eval = (state.global_step, measured)
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in logs.items()})
        append_jsonl(self.path, record)


class SaveAtStepsCallback(TrainerCallback):
    """Save a checkpoint at each of `steps` as well as every `save_steps` (e.g. log-spaced checkpoints)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs: Any):
        if state.global_step in self.steps:
            control.should_save = True
        return control
