"""Trainer callbacks, each usable alone in anyone's `Trainer`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from workbench.io import append_jsonl, atomic_write_text, read_jsonl

__all__ = ["EvalOnSaveCallback", "MetricsJsonlCallback", "SaveAtStepsCallback"]


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


class SaveAtStepsCallback(TrainerCallback):
    """Save a checkpoint at each of `steps` as well as every `save_steps` (e.g. log-spaced checkpoints)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs: Any):
        if state.global_step in self.steps:
            control.should_save = True
        return control


class EvalOnSaveCallback(TrainerCallback):
    """Run the BOSE evaluator on each checkpoint as it is saved, on rank 0, into `<run>/eval/results.jsonl`.

    The checkpoint is read back from disk into a separate model (so any ZeRO stage works and the training
    model is untouched), with `limit` items per task; RNG states are restored afterwards so training is
    unchanged. The other ranks wait at their next collective: keep `limit` small enough that this takes well
    under the distributed timeout (`training.ddp_timeout`, 30 minutes by default).
    """

    def __init__(self, eval_cfg, run_dir: str | Path, tokenizer_dir: str | Path, world: dict[str, Any],
                 limit: int) -> None:
        self.eval_cfg, self.run_dir, self.limit = eval_cfg, Path(run_dir), limit
        self.tokenizer_dir, self.world = str(tokenizer_dir), world
        self._evaluator = None

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        import numpy as np
        import torch

        from evals.runs import Target, sweep
        from evals.sweep import Evaluator

        checkpoint = self.run_dir / f"checkpoint-{state.global_step}"
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            if self._evaluator is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
                self._evaluator = Evaluator(self.eval_cfg, tokenizer, self.world, self.limit)
            target = Target(self.run_dir.name, self.run_dir / "eval" / "results.jsonl", [checkpoint],
                            self.tokenizer_dir, self.world)
            sweep(target, self.eval_cfg, self.limit, evaluator=self._evaluator, progress=False)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
