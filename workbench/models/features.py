"""What a model brings to its own training, as methods of the run's `MethodStack` (`model_methods`): LoRA+'s
learning rates through the `param_groups` hook, the LoRA update's norm and the load of the model's own learned
routers as logged metrics. The trainer asks the model for them; it has no special case for any of them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from workbench.methods import Method
from workbench.models.lora import (
    LoraDeltaNormCallback,
    check_loraplus_optimizer,
    is_lora_model,
    loraplus_groups,
    loraplus_lr_ratio,
)
from workbench.models.moe_model import RouterLoadCallback


class LoraPlus(Method):
    """LoRA+ (`model.loraplus_lr_ratio`): `lora_B` and 1-D parameters train at ratio x the learning rate, as
    `peft.optimizers.create_loraplus_optimizer` groups them, in the Trainer's own optimizer."""

    name = "model.loraplus"
    checkpointed = False

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio
        self.args: TrainingArguments | None = None

    def setup(self, trainer: Trainer) -> None:
        check_loraplus_optimizer(trainer.args)
        self.args = trainer.args

    def param_groups(self, model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return loraplus_groups(model, groups, self.ratio, self.args)


class LoraDeltaNorm(Method):
    """Logs `lora_delta_norm` (`workbench.models.lora.LoraDeltaNormCallback`) for a model with LoRA layers."""

    name = "model.lora_delta_norm"
    checkpointed = False

    def callbacks(self) -> list[TrainerCallback]:
        return [LoraDeltaNormCallback()]


class RouterLoad(Method):
    """Logs the load of a model's own learned routers (`router_load_*`; nothing for a model without them)."""

    name = "model.router_load"
    checkpointed = False

    def callbacks(self) -> list[TrainerCallback]:
        return [RouterLoadCallback()]


def model_methods(model: torch.nn.Module) -> list[Method]:
    """The methods `model` needs for its own training (see the module docstring)."""
    methods: list[Method] = [RouterLoad()]
    if is_lora_model(model):
        methods.append(LoraDeltaNorm())
    ratio = loraplus_lr_ratio(model)
    if ratio is not None:
        methods.append(LoraPlus(ratio))
    return methods
