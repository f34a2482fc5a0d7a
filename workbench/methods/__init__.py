"""The method interface and registry: a YAML name under `methods:` maps to a `Method` subclass.

A method is built from its config dataclass and may implement any of the hooks below; the
trainer calls each hook of every enabled method in the order the YAML lists them:

    prepare_model(model) -> model          e.g. SMoE conversion, LoRA wrapping
    wrap_collator(collator) -> collator    e.g. Masked Thought's token masking
    callbacks() -> [TrainerCallback]       e.g. SeND masks, the SMoE k schedule, EES logging
    loss(model, inputs, outputs, loss)     e.g. SinKD's Sinkhorn term added to the LM loss
    param_groups(model, groups) -> groups  e.g. ALLoRA's per-parameter learning rates
    state_dict() / load_state_dict(state)  what must survive a restart; saved in every checkpoint

Register a method with `@register("name")` on a `Method` subclass whose `Config` is a dataclass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, TrainerCallback

from workbench.errors import did_you_mean

METHODS: dict[str, type[Method]] = {}


@dataclasses.dataclass
class NoConfig:
    """The config of a method without options."""


class Method:
    """Base class: every hook is optional and defaults to doing nothing."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        return model

    def wrap_collator(self, collator: Any) -> Any:
        return collator

    def callbacks(self) -> list[TrainerCallback]:
        return []

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def param_groups(self, model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method '{self.name}' has no state to restore but the checkpoint has {sorted(state)}")

    @classmethod
    def overrides(cls, hook: str) -> bool:
        """Whether this class implements `hook` itself (the trainer skips hooks nobody implements)."""
        return getattr(cls, hook) is not getattr(Method, hook)


def register(name: str):
    """Class decorator: make `cls` available as `methods: {name: {...}}` in a config."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name '{name}' is already registered by {METHODS[name].__qualname__}")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__qualname__}.Config must be a dataclass")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        valid = ", ".join(sorted(METHODS)) or "(none registered)"
        raise ValueError(f"[{name}] unknown method '{name}'{did_you_mean(name, METHODS)}; valid: {valid}")
    return METHODS[name]


def validate_method_config(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a method's options against its Config dataclass; raise ValueError('[name.field] ...')."""
    from workbench.config import dataclass_options

    return dataclass_options(name, _method_class(name).Config, options)


def build_methods(configs: dict[str, dict[str, Any]]) -> list[Method]:
    """Instantiate the enabled methods, in config order."""
    return [_method_class(name)(_method_class(name).Config(**options)) for name, options in configs.items()]


# Built-in methods register themselves on import.
from workbench.methods import dropout_schedule  # noqa: E402, F401
