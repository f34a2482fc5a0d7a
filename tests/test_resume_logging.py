"""A resumed run logs what an uninterrupted run logs (single process, in this process: the fast tier).

The Trainer keeps the loss since the last log, the sum behind the final `train_loss` and the last logged step in
attributes that `TrainerState` does not save; the workbench saves them per rank in each checkpoint
(`workbench.trainer.LOGGING_STATE`). tests/integration/test_resume_metrics.py does the same on 2 DeepSpeed ranks
with kill -9, for pretraining and LoRA fine-tuning through TRL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config
from transformers import TrainerCallback

from workbench.config import ExperimentConfig
from workbench.io import read_jsonl
from workbench.run import train
from workbench.trainer import LOGGING_STATE

TIMINGS = ("_runtime", "_per_second")  # what two identical runs log differently


class _CrashAt(TrainerCallback):
    """Raises at the end of `step`, as a killed process would stop (after the checkpoints before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def measured(metrics: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in record.items() if not k.endswith(TIMINGS)} for record in read_jsonl(metrics)]


def test_resumed_run_logs_the_same_losses_and_train_loss_as_an_uninterrupted_one(tmp_path):
    """Logged every 2 steps, saved every 3, crashed at step 5: the resume starts at checkpoint-3 with step 3's
    loss not yet logged, so step 4's logged loss and the final train_loss need the saved logging state."""
    training = {"max_steps": 10, "save_steps": 3, "logging_steps": 2}
    straight = ExperimentConfig(**tiny_config(tmp_path, name="straight", training=training))
    split = ExperimentConfig(**tiny_config(tmp_path, name="split", training=training))
    reference = train(straight)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(split, callbacks=[_CrashAt(5)])
    saved = json.loads((split.run_dir / "checkpoint-3" / LOGGING_STATE.format(rank=0)).read_text())
    assert saved["last_logged_step"] == 2 and saved["pending_loss"] > 0
    resumed = train(split, resume=True)
    want, got = measured(straight.run_dir / "metrics.jsonl"), measured(split.run_dir / "metrics.jsonl")
    assert [r["step"] for r in got if "loss" in r] == [2, 4, 6, 8, 10]
    assert got == want
    assert resumed.train_loss == reference.train_loss
    final = next(r for r in want if "train_loss" in r)
    assert final["train_loss"] == reference.train_loss  # the logged and the returned train_loss agree
