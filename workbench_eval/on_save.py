"""The evaluator during training: each checkpoint evaluated as it is saved (`eval.on_save: true`).

Lives in `workbench_eval/` (the library `workbench/` never imports the evaluator); `launch/train.py` adds it:

    callbacks = eval_on_save_callbacks(cfg)        # [] unless eval.on_save; a ConfigError for a run it cannot score
    train(cfg, callbacks=callbacks)
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from datetime import timedelta
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

__all__ = ["EvalOnSaveCallback", "check_on_save", "eval_on_save_callbacks", "restored_random_state", "rng_devices"]


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
    from workbench.base_run import resolve_base_run
    from workbench.models import is_encoder_decoder

    # a base run (`model.name_or_path: runs/<name>`) is read through its checkpoint, as the run will
    if kind == "pretrain" and is_encoder_decoder(resolve_base_run(cfg, report=lambda *_: None).model):
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


def rng_devices() -> tuple[str | None, list[int]]:
    """The accelerator type (`cuda`, `xpu`, ...) and the indices of its devices whose random generators an
    evaluation may draw from: every device once the accelerator is initialised (sampling on a GPU moves that
    GPU's generator), none without an accelerator or before it is initialised (forking would initialise it)."""
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return None, []
    module = torch.get_device_module(accelerator.type)
    initialised = getattr(module, "is_initialized", lambda: True)()
    return accelerator.type, list(range(module.device_count())) if initialised else []


@contextlib.contextmanager
def restored_random_state() -> Iterator[None]:
    """Python's, numpy's, torch's CPU and every accelerator device's (`rng_devices`) random states restored on
    exit, so that whatever the body draws leaves training's random streams where they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    device_type, devices = rng_devices()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class EvalOnSaveCallback(TrainerCallback):
    """Run the BOSE evaluator on each checkpoint as it is saved, on rank 0, into `<run>/eval/results.jsonl`.

    The checkpoint is read back from disk into a separate model (so any ZeRO stage works and the training
    model is untouched), with `limit` items per task, on rank 0's device; the model (and lm-eval's reference
    to it) is freed after the evaluation, so rank 0 holds at most one model beside the training one. Random
    states, the GPUs' included, are restored afterwards so training is unchanged.

    In a run of several processes the others wait for rank 0's evaluation at a barrier of a process group of
    their own (gloo, CPU only: the waiting holds no GPU and no NCCL communicator), created on all ranks as
    training begins with the timeout `eval.on_save_timeout` (seconds): training's collectives keep their
    `training.ddp_timeout`, which an evaluation no longer has to fit in.
    """

    def __init__(self, eval_cfg, run_dir: str | Path, tokenizer_dir: str | Path, world: dict[str, Any],
                 limit: int) -> None:
        self.eval_cfg, self.run_dir, self.limit = eval_cfg, Path(run_dir), limit
        self.tokenizer_dir, self.world = str(tokenizer_dir), world
        self._evaluator = None
        self._waiting_group = None

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        """Every rank of a distributed run joins the group whose barrier waits for rank 0's evaluations."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self._waiting_group is None:
            self._waiting_group = torch.distributed.new_group(
                backend="gloo", timeout=timedelta(seconds=self.eval_cfg.on_save_timeout))

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._evaluate(checkpoint_dir(self.run_dir, state.global_step))
        if self._waiting_group is not None:
            torch.distributed.barrier(group=self._waiting_group)

    def _evaluate(self, checkpoint: Path) -> None:
        """Evaluate `checkpoint` into the run's results, leaving random states as they were; print how long it
        took and, on a GPU, the memory allocated before and after (equal when nothing of it was kept)."""
        start, before = time.monotonic(), device_memory_gb()
        with restored_random_state(), _outside_zero3():
            if self._evaluator is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
                self._evaluator = Evaluator(self.eval_cfg, tokenizer, self.world, self.limit)
            target = Target(self.run_dir.name, results_path(self.run_dir), [checkpoint],
                            self.tokenizer_dir, self.world)
            sweep(target, self.eval_cfg, self.limit, evaluator=self._evaluator, progress=False)
        memory = "" if before is None else f"; GPU memory allocated {before:.2f} GB before, {device_memory_gb():.2f} GB after"
        print(f"[eval] {checkpoint.name} evaluated on save in {time.monotonic() - start:.1f} s{memory}", flush=True)


def device_memory_gb() -> float | None:
    """GiB allocated by torch on this process's GPU, or None without an initialised CUDA device."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.memory_allocated() / 2**30
