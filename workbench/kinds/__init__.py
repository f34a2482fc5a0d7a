"""Run kinds: what a config trains and how. One module per kind, each a `RunKind` subclass registered here.

A kind owns everything that differs between kinds of run: whether a config is of that kind (`matches`), its
config checks (run when the kind is built, before any work), its tokenizer, its `TrainingArguments` class and
the fields it decides, its data pieces (datasets, collator, metrics, description) and its model. Everything
else (precision, process group, methods, checkpoints, resume, the trainer additions) is the same for every
kind and lives in `workbench.run.train`, which never asks which kind it runs.

Built in, tried in this order (the first whose `matches` is true wins):

    classification   texts with labels -> AutoModelForSequenceClassification   (`workbench.kinds.classification`)
    finetune         prompt/completion or chat examples -> TRL's SFTTrainer   (`workbench.kinds.finetuning`)
    pretrain         text packed into blocks -> a causal LM or T5             (`workbench.kinds.pretraining`)

A new kind is one module: subclass `RunKind`, decorate it with `@register_kind(before="pretrain")` (pretraining
takes every config, so a new kind goes before it), and import the module before `train` runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from workbench.config import ExperimentConfig

# name -> module that registers it, in the order kinds are tried; imported on first use
BUILTIN_KINDS: dict[str, str] = {
    "classification": "workbench.kinds.classification",
    "finetune": "workbench.kinds.finetuning",
    "pretrain": "workbench.kinds.pretraining",
}
KINDS: dict[str, type[RunKind]] = {}
_ORDER: list[str] = []


@dataclass
class DataPieces:
    """What a run trains on, in the form its trainer class reads."""

    tokenizer: PreTrainedTokenizerBase
    trainer_class: type
    train_dataset: Any
    eval_dataset: Any
    trainer_kwargs: dict[str, Any]
    description: str  # e.g. "110 training blocks of 32 tokens"
    # what the kind's `model` needs from `data`: `weights_options(args)` (the dtype to load pretrained weights in),
    # and whatever the data decide (label names)
    model_options: dict[str, Any] | None = None


class RunKind:
    """One kind of training run. Built once per run on every rank, after the base model is resolved;
    `__init__` runs the kind's config checks (a `ConfigError` naming the field, before anything is written)."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: ExperimentConfig, report: Callable[..., None] = print) -> None:
        self.cfg, self.report = cfg, report
        self.objective = "causal"
        self.check()

    @classmethod
    def matches(cls, cfg: ExperimentConfig) -> bool:
        """Whether `cfg` is a run of this kind (from the config alone: nothing is loaded)."""
        raise NotImplementedError

    def check(self) -> None:
        """The kind's config checks; may set `self.objective`."""

    def arguments_class(self) -> type[TrainingArguments]:
        return TrainingArguments

    def argument_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The `TrainingArguments` fields (the workbench's defaults under the `training` section) with what this
        kind decides: its own defaults under them, fixed fields over them."""
        return fields

    def data(self, args: TrainingArguments) -> DataPieces:
        raise NotImplementedError

    def architecture(self) -> tuple[Any, type]:
        """The config and model class of this run's model, known from the config alone (no weights, no data):
        what the methods' sites are checked on before the data are prepared."""
        from workbench.models import architecture

        return architecture(self.cfg.model)

    def model(self, tokenizer: PreTrainedTokenizerBase, pieces: DataPieces, added_tokens: int) -> PreTrainedModel:
        raise NotImplementedError


def weights_options(args: TrainingArguments, **options: Any) -> dict[str, Any]:
    """`DataPieces.model_options` with `dtype`, the dtype the run's model loads its weights in (the training
    dtype under DeepSpeed, else fp32: `workbench.models.training_weights_dtype`), beside `options`."""
    from workbench.models import training_weights_dtype_of

    return {"dtype": training_weights_dtype_of(args), **options}


def register_kind(before: str | None = None):
    """Class decorator: make a `RunKind` subclass a kind that `kind_for` tries (before kind `before`, else last)."""

    def decorate(cls: type[RunKind]) -> type[RunKind]:
        if not cls.name:
            raise TypeError(f"{cls.__qualname__} needs a name")
        if cls.name not in BUILTIN_KINDS:  # the built-in kinds first, so `before` finds them
            run_kinds()
        if cls.name in _ORDER:
            _ORDER.remove(cls.name)
        KINDS[cls.name] = cls
        place = _ORDER.index(before) if before in _ORDER else len(_ORDER)
        _ORDER.insert(place, cls.name)
        return cls

    return decorate


def run_kinds() -> list[type[RunKind]]:
    """Every kind, in the order `kind_for` tries them (the built-in ones imported)."""
    for module in BUILTIN_KINDS.values():
        importlib.import_module(module)
    return [KINDS[name] for name in _ORDER]


def kind_for(cfg: ExperimentConfig) -> type[RunKind]:
    """The kind of run `cfg` is: the first registered kind whose `matches` is true."""
    for kind in run_kinds():
        if kind.matches(cfg):
            return kind
    raise LookupError("no run kind matches the config")  # pretraining takes every config
