"""The evaluator during training: each checkpoint evaluated as it is saved (`eval.on_save: true`).

Lives in `workbench_eval/` (the library `workbench/` never imports the evaluator); `launch/train.py` adds it:

    callbacks = eval_on_save_callbacks(cfg)        # [] unless eval.on_save; a ConfigError for a run it cannot score
    train(cfg, callbacks=callbacks)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from workbench.config import ExperimentConfig
from workbench.errors import ConfigError
from workbench.layout import TOKENIZER_DIR, checkpoint_dir, results_path
from workbench_eval.config import eval_config
from workbench_eval.data import training_data_options
from workbench_eval.evaluator import Evaluator
from workbench_eval.sweep import Target, sweep

__all__ = ["EvalOnSaveCallback", "check_on_save", "eval_on_save_callbacks"]


@contextlib.contextmanager
def _outside_zero3() -> Iterator[None]:
    """Load the evaluated checkpoint as a plain model even while a ZeRO-3 run is training.

    transformers keeps the training run's DeepSpeed config in a module-level weak reference; with ZeRO-3 in it,
    `from_pretrained` builds the model inside `deepspeed.zero.Init`, whose broadcasts wait for every rank, and
    only rank 0 evaluates: the run would hang. The reference is cleared for the evaluation and restored."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def check_on_save(cfg: ExperimentConfig) -> None:
    """A ConfigError naming `eval.on_save` when it is set for a run whose checkpoints the evaluator cannot score
    (it scores causal LMs): a sequence-classification run, or a pretraining run of an encoder-decoder model."""
    if not eval_config(cfg).on_save:
        return
    from workbench.kinds import kind_for

    kind = kind_for(cfg).name
    if kind == "classification":
        raise ConfigError("field 'eval.on_save': the BOSE evaluator scores causal LMs and this run classifies "
                          "texts; set it to false (eval_accuracy is reported on the held-out split)")
    from workbench.models import is_encoder_decoder

    if kind == "pretrain" and is_encoder_decoder(cfg.model):
        raise ConfigError("field 'eval.on_save': the BOSE evaluator scores causal LMs and this model is an "
                          "encoder-decoder; set it to false (validation NLL and accuracy are still reported)")


def eval_on_save_callbacks(cfg: ExperimentConfig) -> list[TrainerCallback]:
    """`[EvalOnSaveCallback]` for a config with `eval.on_save: true`, else `[]`; a ConfigError (`check_on_save`)
    for a run the evaluator cannot score, before the run starts."""
    evaluation = eval_config(cfg)
    if not evaluation.on_save:
        return []
    check_on_save(cfg)
    world = training_data_options(cfg.model_dump(mode="json"))
    return [EvalOnSaveCallback(evaluation, cfg.run_dir, cfg.run_dir / TOKENIZER_DIR, world, evaluation.on_save_limit)]


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
        checkpoint = checkpoint_dir(self.run_dir, state.global_step)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]), _outside_zero3():
            if self._evaluator is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
                self._evaluator = Evaluator(self.eval_cfg, tokenizer, self.world, self.limit)
            target = Target(self.run_dir.name, results_path(self.run_dir), [checkpoint],
                            self.tokenizer_dir, self.world)
            sweep(target, self.eval_cfg, self.limit, evaluator=self._evaluator, progress=False)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
