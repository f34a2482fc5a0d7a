"""The workbench trainer: Hugging Face `Trainer` plus the enabled methods' hooks, method state in every
checkpoint, a checkpoint manifest written last, and a stop on the first non-finite loss.

The additions live in `WorkbenchMixin`, which goes over any `Trainer` subclass: `WorkbenchTrainer` (plain
`Trainer`, pretraining on packed text) and `WorkbenchSFTTrainer` (TRL's `SFTTrainer`, fine-tuning on
prompt/completion or chat data with TRL's own tokenisation, completion masks and padding).
With no method enabled it adds one `isfinite` per step and a manifest per save to the plain `Trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from workbench.checkpoints import write_manifest
from workbench.errors import CheckpointError, TrainingDiverged
from workbench.methods import Method
from workbench.methods.stack import MethodStack
from workbench.models.features import model_methods
from workbench.models.flops import FlopCounter

METHOD_STATE = "workbench_methods_rank{rank}.pt"


class _AfterOptimizerStep(TrainerCallback):
    """Calls the stack's `after_optimizer_step` once the optimizer has updated the weights.

    `on_optimizer_step` fires after `optimizer.step()`; under DeepSpeed that call is a no-op and the engine
    steps inside `backward` at the accumulation boundary, which is earlier still, so in both cases the new
    weights are in place (in the master copy under ZeRO-1/2/3: read them with `workbench.distributed`)."""

    def __init__(self, trainer: WorkbenchMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs: Any) -> None:
        self.trainer.methods.after_optimizer_step(self.trainer.model, self.trainer)


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

    # --- method state and the manifest --------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.methods.checkpointed():
            torch.save(self.methods.state_dict(), checkpoint / METHOD_STATE.format(rank=self.args.process_index))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_manifest(checkpoint, self.state.global_step)

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

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if isinstance(resume_from_checkpoint, (str, Path)):
            self.load_method_state(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except RuntimeError as err:  # a strict state-dict load (DeepSpeed's engine, torch) that does not fit
            if "state_dict" not in str(err) or resume_from_checkpoint is None:
                raise
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
            raise CheckpointError(f"checkpoint '{resume_from_checkpoint}' does not fit the model being trained "
                                  f"(a method changed the architecture?): {detail}") from None


class WorkbenchTrainer(WorkbenchMixin, Trainer):
    """`Trainer` that composes `methods`: pretraining on packed text (and anyone's own data and collator)."""


def sft_trainer_class() -> type:
    """`WorkbenchSFTTrainer`: TRL's `SFTTrainer` with the workbench additions (TRL imported on first use)."""
    global _SFT_TRAINER
    if _SFT_TRAINER is None:
        from trl import SFTTrainer

        class WorkbenchSFTTrainer(WorkbenchMixin, SFTTrainer):
            """`SFTTrainer` that composes `methods`: fine-tuning on prompt/completion or conversational data."""

        _SFT_TRAINER = WorkbenchSFTTrainer
    return _SFT_TRAINER


_SFT_TRAINER: type | None = None
