"""The method interface and registry: a YAML name under `methods:` maps to a `Method` subclass.

A method is built from its config dataclass and may implement any of the hooks below; the trainer calls
each hook of every enabled method in the order the YAML lists them (but `prepare_model`: methods that replace
parts of the model first, see below), at these points of a run:

    prepare_tokenizer(tokenizer) -> tok    before the model is built or resized (Masked Thought's <mask>)
    prepare_model(model) -> model          after the model (and LoRA) is built, before the Trainer
                                           (SMoE conversion); under ZeRO-3 parameters are already partitioned
    wrap_collator(collator) -> collator    on the Trainer's collator, TRL's included (Masked Thought)
    callbacks() -> [TrainerCallback]       added before the run's own callbacks (SeND masks, k schedules)
    setup(trainer)                         once, after the Trainer is built: args, accelerator, datasets,
                                           tokenizer (SinKD's teacher prepared like TRL's reference
                                           models, SeND's tracking data); every rank calls it
    loss(model, inputs, outputs, loss, num_items_in_batch) -> loss
                                           every micro-batch, after the model's own loss; normalise an
                                           added per-token term by `num_items_in_batch` when it is given
    param_groups(model, groups) -> groups  once, on the optimizer's groups (per-group learning rates)
    after_optimizer_step(model, trainer)   every optimizer step, after the update, on every rank; read and
                                           write weights with `workbench.distributed` (all ZeRO stages)
    state_dict() / load_state_dict(state)  what must survive a restart: tensors of any size, numbers,
                                           strings, lists, dicts; saved per rank in every checkpoint

`needs_full_finetuning = True` makes a method refuse `model.lora` (a config error naming both); a method with other
needs of `model.lora` (ALLoRA: no dropout, no DoRA) says so in the class method `check_lora`, run with the config.

What a method declares so that several can share a run (`workbench.methods.stack` says how their hooks combine;
`check_compatible` turns a pair that cannot into a one-line config error naming both, before any work):

    needs_full_finetuning                  trains every weight: refuses `model.lora` and any `needs_lora` method
    needs_lora                             trains LoRA adapters (ALLoRA)
    replaces / replaced_parts(config)      parts of the model it swaps for modules of its own, by the attribute
                                           name in each decoder layer ("mlp": SMoE's experts); such methods
                                           prepare the model before all others, so that a hook another method
                                           puts on that part lands on the new module. Two methods that replace
                                           one part cannot share a run
    read_parts(config)                     parts whose own modules or weights it uses all run long, each with
                                           why (SeND's `site: weights` zeroes the dense MLP's rows): a method
                                           that replaces one of them cannot share its run

Built-in methods are listed in `BUILTIN` and imported only when a config names them, so validating a
config imports nothing it does not use. Your own method, outside this package: `@register("name")` in a
module you import, or name it in the YAML as `package.module:ClassName`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from workbench.errors import did_you_mean
from workbench.options import dataclass_options

METHODS: dict[str, type[Method]] = {}
BUILTIN: dict[str, str] = {  # name -> module that registers it, imported on first use
    "dropout_schedule": "workbench.methods.dropout_schedule",
    "drop_path": "workbench.methods.drop_path",
    "masked_thought": "workbench.methods.masked_thought",
    "allora": "workbench.methods.allora",
    "smoe_dropout": "workbench.methods.smoe_dropout",
    "sinkd": "workbench.methods.sinkd",
    "send": "workbench.methods.send",
}


@dataclasses.dataclass
class NoConfig:
    """The config of a method without options."""


class Method:
    """Base class: every hook is optional and defaults to doing nothing."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    needs_full_finetuning: ClassVar[bool] = False
    needs_lora: ClassVar[bool] = False  # trains LoRA adapters (refuses a run without model.lora)
    checkpointed: ClassVar[bool] = True  # has an entry in each checkpoint's method state (a model feature: none)
    replaces: ClassVar[tuple[str, ...]] = ()  # parts of the model it swaps for its own modules, e.g. ("mlp",)
    logged_metrics: ClassVar[tuple[str, ...] | None] = None  # what it adds to the logs (None: not declared)
    uses_sites: ClassVar[bool] = False  # acts on modules found by `workbench.models.structure` (checked early)

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def check_lora(cls, config: Any, lora: dict[str, Any] | None) -> None:
        """Raise ValueError('[dotted.field] why') when the run's `model.lora` options (None: no LoRA, every weight
        trains) do not suit this method with options `config`; called as the experiment config is validated."""
        if lora is not None and cls.needs_full_finetuning:
            raise ValueError(f"[model.lora] method '{cls.name}' trains every weight and cannot run on LoRA "
                             "adapters: remove 'model.lora' or the method")

    @classmethod
    def replaced_parts(cls, config: Any) -> tuple[str, ...]:
        """The parts of the model this method replaces with options `config` (default: `replaces`)."""
        return cls.replaces

    @classmethod
    def read_parts(cls, config: Any) -> dict[str, str]:
        """The parts whose own modules or weights this method uses all run long with options `config`, each with
        why, in a clause for the config error (default: none)."""
        return {}

    @classmethod
    def check_sites(cls, config: Any, sites: Any) -> None:
        """Raise ValueError (one line: what is missing) when the model's sites (`workbench.models.structure.
        ModelSites`, traced from the run's config before any data are prepared) do not give this method with
        options `config` what it acts on; methods that act on no particular module leave `uses_sites` False."""

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        return tokenizer

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        return model

    def wrap_collator(self, collator: Any) -> Any:
        return collator

    def callbacks(self) -> list[TrainerCallback]:
        return []

    def setup(self, trainer: Trainer) -> None:
        return None

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any, loss: torch.Tensor,
             num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        return loss

    def after_optimizer_step(self, model: torch.nn.Module, trainer: Trainer) -> None:
        return None

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


def check_methods_on_model(configs: dict[str, dict[str, Any]], architecture: Callable[[], tuple[Any, type]]) -> None:
    """Trace the run's model architecture (`architecture()`: config and class, no weights) when a method of
    `configs` (the `methods:` section) acts on sites of it, and raise ConfigError naming the method and the model
    class when one lacks what it needs: before the data are prepared and before any method is built, so a model a
    method cannot act on is a config error, never a run."""
    from workbench.errors import ConfigError

    needing = [(name, method_class(name)) for name in configs if method_class(name).uses_sites]
    if not needing:
        return
    from workbench.models.structure import SiteError, traced_sites

    config, model_class = architecture()
    try:
        sites = traced_sites(config, model_class)
    except SiteError as err:
        raise ConfigError(f"field 'methods.{needing[0][0]}': {err}") from None
    for name, cls in needing:
        try:
            cls.check_sites(cls.Config(**configs[name]), sites)
        except ValueError as err:
            raise ConfigError(f"field 'methods.{name}': {sites.model_class}: {err}") from None


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


def method_class(name: str) -> type[Method]:
    if name not in METHODS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in METHODS and ":" in name:
        return _import_method(name)
    if name not in METHODS:
        known = sorted({*METHODS, *BUILTIN})
        raise ValueError(f"[{name}] unknown method '{name}'{did_you_mean(name, known)}; valid: "
                         f"{', '.join(known) or '(none registered)'}, or package.module:ClassName")
    return METHODS[name]


def _import_method(path: str) -> type[Method]:
    """`package.module:ClassName` -> that Method subclass (registered under `path` if it has no name), from
    the Python path or, as `python -m` would, the current directory (`launch/train.py` puts `launch/` first and
    the `workbench` command its bin folder; `python -m workbench_cli.train`, as `deepspeed --module` starts it,
    has the current directory already)."""
    module_name, _, class_name = path.partition(":")
    if os.getcwd() not in sys.path and importlib.util.find_spec(module_name.partition(".")[0]) is None:
        sys.path.append(os.getcwd())
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"[{path}] cannot import method '{path}': {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"[{path}] '{path}' is not a Method subclass")
    if not cls.name:
        register(path)(cls)
    return cls


def available_methods() -> dict[str, type[Method]]:
    """Every built-in and registered method, imported (for `launch/train.py --list methods`)."""
    for module in BUILTIN.values():
        importlib.import_module(module)
    return dict(sorted(METHODS.items()))


def validate_method_config(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a method's options against its Config dataclass; raise ValueError('[name.field] ...')."""
    return dataclass_options(name, method_class(name).Config, options)


def build_methods(configs: dict[str, dict[str, Any]]) -> list[Method]:
    """Instantiate the enabled methods, in config order."""
    return [method_class(name)(method_class(name).Config(**options)) for name, options in configs.items()]
