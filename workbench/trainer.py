"""The workbench trainer: Hugging Face `Trainer` plus the enabled methods' hooks, method state and logging state
in every checkpoint, a checkpoint manifest written last, and a stop on the first non-finite loss.

The additions live in `WorkbenchMixin`, which goes over any `Trainer` subclass: `WorkbenchTrainer` (plain
`Trainer`, pretraining on packed text) and `WorkbenchSFTTrainer` (TRL's `SFTTrainer`, fine-tuning on
prompt/completion or chat data with TRL's own tokenisation, completion masks and padding).
With no method enabled it adds one `isfinite` per step and a manifest per save to the plain `Trainer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from workbench.checkpoints import rank_file_sizes, write_manifest
from workbench.errors import CheckpointError, TrainingDiverged
from workbench.io import atomic_write_text
from workbench.methods import Method
from workbench.methods.stack import MethodStack
from workbench.models.features import model_methods
from workbench.models.flops import FlopCounter

METHOD_STATE = "workbench_methods_rank{rank}.pt"
LOGGING_STATE = "workbench_logging_rank{rank}.json"
# cuBLAS's reproducible workspace setting under `training.full_determinism` (8 buffers of 4 MiB; transformers sets
# ":16:8", 8 buffers of 16 KiB, which PyTorch's reproducibility notes say may slow matrix products)
DETERMINISTIC_CUBLAS_WORKSPACE = ":4096:8"


def file_sizes_on_rank0(checkpoint: Path, rank: int) -> dict[str, int] | None:
    """The sizes of the files of `checkpoint`, each measured by the rank that wrote it (`rank_file_sizes`: on a
    shared file system another node may see them late or stale), gathered to rank 0 for its manifest; None on
    the other ranks. A collective (`gather_object`: under NCCL over `torch.cuda.current_device()`, which the
    Trainer set to this rank's GPU), so it returns on rank 0 only after every rank has measured its files; one
    process without a process group measures them all itself."""
    own = rank_file_sizes(checkpoint, rank)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return own
    on_rank0 = torch.distributed.get_rank() == 0
    gathered = [{} for _ in range(torch.distributed.get_world_size())] if on_rank0 else None
    torch.distributed.gather_object(own, gathered, dst=0)
    return {name: size for sizes in gathered for name, size in sizes.items()} if gathered is not None else None


class _AfterOptimizerStep(TrainerCallback):
    """Calls the stack's `after_optimizer_step` once the optimizer has updated the weights.

    `on_optimizer_step` fires after `optimizer.step()`; under DeepSpeed that call is a no-op and the engine
    steps inside `backward` at the accumulation boundary, which is earlier still, so in both cases the new
    weights are in place (in the master copy under ZeRO-1/2/3: read them with `workbench.distributed`)."""

    def __init__(self, trainer: WorkbenchMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs: Any) -> None:
        self.trainer.methods.after_optimizer_step(self.trainer.model, self.trainer)


class _RestoreLoggingState(TrainerCallback):
    """At the start of training (after the Trainer has zeroed its loss accumulators) puts back what a resumed
    checkpoint's logs had accumulated (`WorkbenchMixin.restore_logging_state`)."""

    def __init__(self, trainer: WorkbenchMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.trainer.begin_logging_state()


class WorkbenchMixin:
    """Method hooks, method state, manifest and NaN stop, over any `transformers.Trainer` subclass.

    Put it first in the bases (`class T(WorkbenchMixin, SFTTrainer)`); it takes `methods=` (a list of methods or
    a `MethodStack`) and passes every other argument on. The model's own features (`model_methods`: LoRA+,
    the LoRA update's norm, router load) go first in the stack; every hook is called through the stack
    (`workbench.methods.stack`, which says how the hooks of several methods combine)."""

    def __init__(self, *args: Any, methods: MethodStack | list[Method] | None = None, **kwargs: Any) -> None:
        self.methods = MethodStack.of(methods).extended(model_methods(kwargs["model"]), first=True)
        kwargs["model"] = self.methods.prepare_model(kwargs["model"])
        method_callbacks = self.methods.callbacks()
        given = list(kwargs.pop("callbacks", None) or [])
        super().__init__(*args, callbacks=method_callbacks + given, **kwargs)
        # method callbacks (and any with `adds_metrics = True`) first, so the metrics they add to the logs reach
        # every other callback: the Trainer puts its reporting integrations (TensorBoard, ...) ahead of the
        # callbacks it is given
        for callback in reversed(method_callbacks + [cb for cb in given if getattr(cb, "adds_metrics", False)]):
            self.callback_handler.callbacks.remove(callback)
            self.callback_handler.callbacks.insert(0, callback)
        self.data_collator = self.methods.wrap_collator(self.data_collator)  # after __init__: TRL builds its own
        if self.methods.implementing("after_optimizer_step"):
            self.add_callback(_AfterOptimizerStep(self))
        self.add_callback(_RestoreLoggingState(self))
        self._saved_logging_state: dict[str, Any] | None = None
        if self.args.full_determinism:  # transformers' `enable_full_determinism` ran in `Trainer.__init__`
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS_WORKSPACE
        self._flops = FlopCounter()
        self.methods.setup(self)

    # --- hooks -------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss, then the stack's `loss` with the forward pass's outputs (logits and graph).

        With loss methods the loss is `transformers.Trainer`'s own computation, one forward pass through the
        model's LM head: TRL's `SFTTrainer` would use its fused LM head, which returns per-token
        log-probabilities and no logits (its `entropy`/`mean_token_accuracy` logs are then absent).
        `num_items_in_batch` reaches the hooks as the model's loss's own denominator: the global token count
        over ranks and accumulation steps divided by the ranks, because the Trainer multiplies the loss by the
        ranks when it averages tokens across devices; `None` where the model's loss is a per-micro-batch mean."""
        if not self.methods.implementing("loss"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if getattr(getattr(self.model, "config", None), "use_cache", False) and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}  # as SFTTrainer does: a cache is no use to a training step
        loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        if items is not None and self.args.average_tokens_across_devices:
            items = items / max(1, self.accelerator.num_processes // self.get_tp_size())
        loss = self.methods.loss(model, inputs, outputs, loss, items)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.methods.implementing("param_groups") and not getattr(optimizer, "_workbench_grouped", False):
            # under DeepSpeed the Trainer calls create_optimizer twice on one optimizer: group it once
            groups = self.methods.param_groups(self.model if model is None else model,
                                               [dict(group) for group in optimizer.param_groups])
            optimizer.param_groups.clear()
            for group in groups:  # add_param_group fills in the optimizer's defaults for missing options
                optimizer.add_param_group(group)
            optimizer._workbench_grouped = True
        return optimizer

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """`total_flos` as 6 x the parameters a token passes through x tokens (`models.flops.FlopCounter`)."""
        model = self.accelerator.unwrap_model(self.model)
        if "input_ids" not in inputs or not hasattr(model, "num_parameters"):
            return super().floating_point_ops(inputs)
        return self._flops(model, inputs["input_ids"].numel())

    # --- a non-finite loss stops the run before anything is saved -------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).item():
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.state.global_step + 1}: stopping; the last good checkpoint "
                f"is kept in '{self.args.output_dir}' (lower the learning rate or check the data)"
            )
        return loss

    # --- logging state: a resumed run logs what an uninterrupted one logs -------------------------------------
    def logging_state(self) -> dict[str, Any]:
        """What this rank has accumulated towards its logs since training began, for a checkpoint.

        The Trainer keeps it in attributes that `TrainerState` does not save, so a resumed run would log its
        first loss over the wrong steps and a final `train_loss` over the resumed steps only:
        `loss_sum` (the logged steps' losses, each the mean over ranks; the same on every rank),
        `pending_loss` (this rank's losses since the last log), `last_logged_step`, and `loss_counted_from`
        (the step `loss_sum` counts from: 0, or the resumed step of a checkpoint saved without this state)."""
        return {"loss_sum": self._total_loss_scalar, "pending_loss": self._tr_loss.item(),
                "last_logged_step": self._globalstep_last_logged, "loss_counted_from": self._loss_counted_from}

    def restore_logging_state(self, saved: dict[str, Any]) -> None:
        """Put back what `logging_state` saved (at the start of training, after the Trainer zeroed it)."""
        self._total_loss_scalar = saved["loss_sum"]
        self._tr_loss.fill_(saved["pending_loss"])
        self._globalstep_last_logged = saved["last_logged_step"]
        self._loss_counted_from = saved["loss_counted_from"]

    def begin_logging_state(self) -> None:
        """At the start of training: count the loss from here, or from where the resumed checkpoint counted."""
        self._loss_counted_from = self.state.global_step
        if self._saved_logging_state is not None:
            self.restore_logging_state(self._saved_logging_state)

    def read_logging_state(self, checkpoint: str | Path) -> dict[str, Any] | None:
        """This rank's logging state in `checkpoint`; rank 0's without its pending loss for a rank the saved run
        did not have; None for a checkpoint saved without one (the Trainer then counts the resumed steps only)."""
        own = Path(checkpoint) / LOGGING_STATE.format(rank=self.args.process_index)
        if own.is_file():
            return json.loads(own.read_text())
        first = Path(checkpoint) / LOGGING_STATE.format(rank=0)
        return {**json.loads(first.read_text()), "pending_loss": 0.0} if first.is_file() else None

    def run_train_loss(self) -> float:
        """The mean training loss of the whole run, resumed or not: `loss_sum / (global_step - loss_counted_from)`
        (transformers divides by the steps of this `train()` call, which after a resume are not the run's)."""
        return self._total_loss_scalar / max(self.state.global_step - self._loss_counted_from, 0.001)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self.is_in_train:  # the summary at the end of training
            logs["train_loss"] = self.run_train_loss()
        super().log(logs, start_time)

    # --- method state, logging state and the manifest ---------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        rank = self.args.process_index
        if self.methods.checkpointed():
            torch.save(self.methods.state_dict(), checkpoint / METHOD_STATE.format(rank=rank))
        atomic_write_text(checkpoint / LOGGING_STATE.format(rank=rank), json.dumps(self.logging_state()))
        if self.args.should_save:  # files callbacks add to a checkpoint (`save_files`), before the manifest lists it
            for callback in self.callback_handler.callbacks:
                if callable(getattr(callback, "save_files", None)):
                    callback.save_files(checkpoint)
        sizes = file_sizes_on_rank0(checkpoint, rank)  # a collective: every rank has saved when rank 0 has them
        if self.args.should_save:
            write_manifest(checkpoint, self.state.global_step, sizes)

    def load_method_state(self, checkpoint: str | Path) -> None:
        """Restore every method's state from `checkpoint` (this rank's file, else rank 0's)."""
        if not self.methods.checkpointed():  # nothing was saved
            return
        path = Path(checkpoint) / METHOD_STATE.format(rank=self.args.process_index)
        if not path.is_file():
            path = Path(checkpoint) / METHOD_STATE.format(rank=0)
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{checkpoint}' has no method state ({path.name}) to resume from")
        try:
            self.methods.load_state_dict(torch.load(path, weights_only=True), f"checkpoint '{checkpoint}'")
        except KeyError as err:
            raise CheckpointError(err.args[0]) from None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Work around transformers 5.24 loading a checkpoint's raw keys without the model's renamings
        (GPT-NeoX saves `embed_out.weight` for `lm_head.weight`, which the plain path then drops)."""
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        if self.is_deepspeed_enabled or model is not None or not weights.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        with safe_open(str(weights), framework="pt") as handle:
            saved_keys = set(handle.keys())
        if saved_keys == set(self.model.state_dict()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The model's own class renames the checkpoint's keys; layers a method added (`prepare_model`) are not
        # part of that class, and are read by their own names from the file. Anything still missing, or of
        # another shape, fails the strict load: never resume on freshly initialised weights.
        reloaded = type(self.model).from_pretrained(resume_from_checkpoint, dtype=self.model.dtype)
        state = reloaded.state_dict()
        added = [key for key in self.model.state_dict() if key not in state and key in saved_keys]
        if added:
            with safe_open(str(weights), framework="pt") as handle:
                state.update({key: handle.get_tensor(key) for key in added})
        self.model.load_state_dict(state, strict=True)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """`Trainer.train`, with the method and logging state of `resume_from_checkpoint` (a path) restored and
        the whole run's mean loss as `training_loss` (`run_train_loss`)."""
        self._saved_logging_state = None
        if isinstance(resume_from_checkpoint, (str, Path)):
            self.load_method_state(resume_from_checkpoint)
            self._saved_logging_state = self.read_logging_state(resume_from_checkpoint)
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except RuntimeError as err:  # a strict state-dict load (DeepSpeed's engine, torch) that does not fit
            if "state_dict" not in str(err) or resume_from_checkpoint is None:
                raise
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
            raise CheckpointError(f"checkpoint '{resume_from_checkpoint}' does not fit the model being trained "
                                  f"(a method changed the architecture?): {detail}") from None
        train_loss = self.run_train_loss()
        return TrainOutput(output.global_step, train_loss, {**output.metrics, "train_loss": train_loss})


class WorkbenchTrainer(WorkbenchMixin, Trainer):
    """`Trainer` that composes `methods`: pretraining on packed text (and anyone's own data and collator)."""


def sft_trainer_class() -> type:
    """`WorkbenchSFTTrainer`: TRL's `SFTTrainer` with the workbench additions (TRL imported on first use)."""
    global _SFT_TRAINER
    if _SFT_TRAINER is None:
        from trl import SFTTrainer

        class WorkbenchSFTTrainer(WorkbenchMixin, SFTTrainer):
            """`SFTTrainer` that composes `methods`: fine-tuning on prompt/completion or conversational data."""

            def logging_state(self) -> dict[str, Any]:
                """The Trainer's logging state plus TRL's: the tokens trained on so far (`num_tokens`, the same on
                every rank) and the training metrics collected since the last log (entropy, token accuracy)."""
                return {**super().logging_state(), "num_tokens": self._total_train_tokens,
                        "pending_metrics": {key: list(values) for key, values in self._metrics["train"].items()}}

            def restore_logging_state(self, saved: dict[str, Any]) -> None:
                super().restore_logging_state(saved)
                self._total_train_tokens = saved["num_tokens"]
                self._metrics["train"].clear()
                self._metrics["train"].update(saved["pending_metrics"])

        _SFT_TRAINER = WorkbenchSFTTrainer
    return _SFT_TRAINER


_SFT_TRAINER: type | None = None
