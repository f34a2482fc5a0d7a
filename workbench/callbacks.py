"""Trainer callbacks, each usable alone in anyone's `Trainer`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from workbench.io import append_jsonl, atomic_write_text, read_jsonl

__all__ = ["MetricsJsonlCallback"]


class MetricsJsonlCallback(TrainerCallback):
    """One JSON line per logging step (`step`, `epoch` and everything logged) in `path`, from rank 0.

    On resume, lines from steps after the resumed checkpoint (which will be trained again) are dropped,
    so the file always describes one run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.path.is_file():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= state.global_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in logs.items()})
        append_jsonl(self.path, record)
