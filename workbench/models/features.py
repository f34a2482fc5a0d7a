"""What a model brings to its own training, as methods of the run's `MethodStack` (`model_methods`): LoRA+'s
learning rates through the `param_groups` hook, the LoRA update's norm and the load of the model's own learned
routers as logged metrics. The trainer asks the model for them; it has no special case for any of them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from workbench.distributed import gathered_parameters
from workbench.methods import Method
from workbench.models.lora import check_loraplus_optimizer, is_lora_model, loraplus_groups, loraplus_lr_ratio
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


def product_frobenius_norm(weight_a: torch.Tensor, weight_b: torch.Tensor) -> torch.Tensor:
    """‖BA‖_F for B (out x r) and A (r x in) without forming BA: ‖BA‖_F² = tr((BᵀB)(AAᵀ)) = Σ_ij (BᵀB)_ij (AAᵀ)_ij
    (both r x r and symmetric), in fp32 at least; a 0-d tensor on the factors' device."""
    dtype = torch.promote_types(weight_a.dtype, torch.float32)
    a, b = weight_a.detach().to(dtype), weight_b.detach().to(dtype)
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt()


def lora_delta_norm(model: torch.nn.Module) -> float | None:
    """Mean over the model's LoRA layers (active adapters) of ‖scaling · BA‖_F; None without LoRA layers. Under
    ZeRO-3 every factor is gathered at once (one collective; every rank calls it) and the mean is read on the
    host once."""
    from peft.tuners.lora import Linear as LoraLinear

    adapters = [(module, name) for module in model.modules() if isinstance(module, LoraLinear)
                for name in module.active_adapters if name in module.lora_A]
    if not adapters:
        return None
    factors = [(module.lora_A[name].weight, module.lora_B[name].weight) for module, name in adapters]
    with gathered_parameters([p for pair in factors for p in pair]), torch.no_grad():
        norms = [abs(float(module.scaling[name])) * product_frobenius_norm(a, b)
                 for (module, name), (a, b) in zip(adapters, factors, strict=True)]
        device = norms[0].device
        return torch.stack([norm.to(device) for norm in norms]).double().mean().item()


class LoraDeltaNormCallback(TrainerCallback):
    """Logs `lora_delta_norm`, the mean over LoRA layers of ‖scaling · BA‖_F (the adapters' change to each weight),
    at every logging step, so adapter variants (LoRA, rsLoRA, LoRA+, ALLoRA) can be compared on how fast their
    update grows. Every rank computes it (ZeRO-3 gathers the factors: a collective)."""

    adds_metrics = True

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        self.model = model

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or self.model is None or "loss" not in logs:  # training-step logs only
            return
        norm = lora_delta_norm(self.model)
        if norm is not None:
            logs["lora_delta_norm"] = norm


class LoraDeltaNorm(Method):
    """Logs `lora_delta_norm` (`LoraDeltaNormCallback`) for a model with LoRA layers."""

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
