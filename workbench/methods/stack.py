"""`MethodStack`: the enabled methods of a run, and the one place each of their hooks is called.

The stack holds the model's own features (`workbench.models.features`: LoRA+'s learning rates, the LoRA update's
norm, the load of learned routers) followed by the config's methods in YAML order, and defines how hooks of
several methods combine:

    prepare_tokenizer                   chained in order: each method gets what the one before returned
    prepare_model                       chained: first the methods that replace parts of the model
                                        (`Method.replaced_parts`: SMoE's MLPs), then the others, each group in
                                        order; so a hook another method puts on a part (drop_path's branches,
                                        dropout_schedule's residual dropout, SeND's `site: mlp`) lands on the
                                        module that runs, the replacement, whatever the YAML order
    wrap_collator                       nested in order: the first method wraps the Trainer's collator, the
                                        second wraps that, ... (a batch passes the first method's wrapper first)
    callbacks                           all of them, in order, ahead of the run's own callbacks
    setup, after_optimizer_step         each method once, in order
    param_groups                        chained in order over the optimizer's groups
    loss                                independent of order: every method gets the model's own loss L0 (never
                                        another method's result) and returns the loss it alone would train on,
                                        L_m; the step trains on L0 + sum_m (L_m - L0). A method that adds a term
                                        (SMoE's balance loss) and one that mixes L0 with another (SinKD's
                                        (1-a) L0 + a KD + b S) then add up to (1-a) L0 + a KD + b S + l B in
                                        either order. With one loss method the step trains on L_m itself.
    state_dict                          one entry per method, by name

Two methods that cannot share a run are a config error naming both (`check_compatible`, called as the config is
validated, before any work): one that trains every weight beside one that needs LoRA adapters, two that replace
the same part of the model (`Method.replaced_parts`), and one that replaces a part whose own weights the other
uses all run long (`Method.read_parts`: SeND's `site: weights` beside SMoE's experts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from workbench.methods import Method, method_class


class MethodStack:
    """The methods of a run, in order; every hook of every method is called through it."""

    def __init__(self, methods: Iterable[Method] = ()) -> None:
        self.methods: list[Method] = list(methods)
        self._implementing: dict[str, list[Method]] = {}
        names = [method.name for method in self.methods]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"method '{repeated[0]}' is in the stack twice")

    @classmethod
    def of(cls, methods: MethodStack | Sequence[Method] | None) -> MethodStack:
        return methods if isinstance(methods, MethodStack) else cls(methods or ())

    def __iter__(self):
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    def __bool__(self) -> bool:
        return bool(self.methods)

    def extended(self, methods: Iterable[Method], first: bool = False) -> MethodStack:
        """A stack with `methods` added at the end (or at the start, `first`)."""
        added = list(methods)
        return MethodStack(added + self.methods if first else self.methods + added)

    def implementing(self, hook: str) -> list[Method]:
        """The methods that implement `hook`, in order (found once per hook: the stack does not change)."""
        if hook not in self._implementing:
            self._implementing[hook] = [method for method in self.methods if method.overrides(hook)]
        return self._implementing[hook]

    # --- hooks, in the order a run calls them ----------------------------------------------------------------
    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
        for method in self.methods:
            tokenizer = method.prepare_tokenizer(tokenizer)
        return tokenizer

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        for method in self.preparation_order():
            model = method.prepare_model(model)
        return model

    def preparation_order(self) -> list[Method]:
        """The methods in the order `prepare_model` runs them: those that replace parts of the model first."""
        replacing = [method for method in self.methods if type(method).replaced_parts(method.config)]
        return replacing + [method for method in self.methods if method not in replacing]

    def callbacks(self) -> list[TrainerCallback]:
        return [callback for method in self.methods for callback in method.callbacks()]

    def wrap_collator(self, collator: Any) -> Any:
        for method in self.methods:
            collator = method.wrap_collator(collator)
        return collator

    def setup(self, trainer: Trainer) -> None:
        for method in self.methods:
            method.setup(trainer)

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any, loss: torch.Tensor,
             num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """L0 + sum_m (L_m - L0) over the methods with a `loss` hook (see the module docstring)."""
        total = None
        for method in self.implementing("loss"):
            own = method.loss(model, inputs, outputs, loss, num_items_in_batch)
            total = own if total is None else total + (own - loss)
        return loss if total is None else total

    def param_groups(self, model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for method in self.implementing("param_groups"):
            groups = method.param_groups(model, groups)
        return groups

    def after_optimizer_step(self, model: torch.nn.Module, trainer: Trainer) -> None:
        for method in self.implementing("after_optimizer_step"):
            method.after_optimizer_step(model, trainer)

    def checkpointed(self) -> list[Method]:
        """The methods with an entry in each checkpoint's method state (`Method.checkpointed`)."""
        return [method for method in self.methods if method.checkpointed]

    def state_dict(self) -> dict[str, Any]:
        return {method.name: method.state_dict() for method in self.checkpointed()}

    def load_state_dict(self, states: dict[str, Any], source: str = "the checkpoint") -> None:
        """Every checkpointed method's state from `states`; a method without an entry is a KeyError naming it."""
        for method in self.checkpointed():
            if method.name not in states:
                raise KeyError(f"{source} has no state for method '{method.name}'")
            method.load_state_dict(states[method.name])


def check_compatible(methods: Mapping[str, Any]) -> None:
    """Raise ValueError('[methods] ...', one line naming both) when two of the configured methods cannot share a
    run: one trains every weight and the other needs LoRA adapters, both replace the same part of the model, or
    one replaces a part whose own weights the other uses. `methods`: name -> its Config (or its options)."""
    entries = []
    for name, config in methods.items():
        cls = method_class(name)
        entries.append((name, cls, cls.Config(**config) if isinstance(config, Mapping) else config))
    for i, first in enumerate(entries):
        for second in entries[i + 1:]:
            problem = _conflict(first, second)
            if problem:
                raise ValueError(f"[methods] methods '{first[0]}' and '{second[0]}' cannot run together: {problem}; "
                                 "remove one of them")


def _conflict(a: tuple[str, type[Method], Any], b: tuple[str, type[Method], Any]) -> str | None:
    """Why methods a and b, each (name, class, config), cannot share a run; None if they can."""
    for (full, full_cls, _), (adapted, adapted_cls, _) in ((a, b), (b, a)):
        if full_cls.needs_full_finetuning and adapted_cls.needs_lora:
            return f"'{full}' trains every weight and '{adapted}' trains LoRA adapters"
    shared = sorted(set(a[1].replaced_parts(a[2])) & set(b[1].replaced_parts(b[2])))
    if shared:
        return f"both replace the model's {', '.join(shared)}"
    for (reader, reader_cls, reader_config), (replacer, replacer_cls, replacer_config) in ((a, b), (b, a)):
        uses = reader_cls.read_parts(reader_config)
        for part in sorted(set(uses) & set(replacer_cls.replaced_parts(replacer_config))):
            return f"'{replacer}' replaces the model's {part} and '{reader}' uses its own weights: {uses[part]}"
    return None
