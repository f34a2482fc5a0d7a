"""Dropout as a schedule: a fixed rate from the start, or "dropstage" (off, then on from a given step).

"To Repeat or Not To Repeat" (Xue et al., NeurIPS 2023, Sec. 5 and Fig. 8) finds dropout the one effective
remedy for multi-epoch degradation, and that switching it on only partway through training (dropstage)
reaches the same final value while training faster early. This method sets the rate of every dropout
site of the model at each step:

- `attention`: the attention-probability dropout (dropout modules inside the attention, GPT-2's `attn_dropout`,
  and the `attention_dropout` rate transformers' attention modules pass to the kernel);
- `residual`: dropout on each residual branch's output before it is added to the residual stream: the model's
  own dropout module on that branch where it has one (GPT-2's, GPT-NeoX's, Phi-3's, BERT's), else a hook on the
  branch's output (Llama, Qwen, Gemma, OPT, Falcon, Mixtral). Never on the layer's output, which is the
  residual stream itself: dropping that would compound over the layers;
- `embedding`: the dropout between the embeddings and the first layer (GPT-2's `drop`, BERT's), else a hook on
  the token-embedding output.

All sites are found by structure (`workbench.models.structure`: branches and dropouts from the model's own data
flow), and the run prints how many of each it found and how many it added as hooks.

    methods:
      dropout_schedule: {rate: 0.1, start_step: 500, sites: [residual, embedding]}

The state (current rate, the step it was switched on) is saved in every checkpoint and restored on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from workbench.methods import Method, register
from workbench.models.structure import SiteError, model_sites

SITES = ("attention", "residual", "embedding")


@dataclass
class DropoutScheduleConfig:
    rate: float = 0.1  # dropout probability once switched on, in [0, 1)
    start_step: int = 0  # 0: on from the first step; > 0: dropstage, off until this optimizer step
    sites: list[str] = field(default_factory=lambda: list(SITES))  # any of attention, residual, embedding

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        unknown = set(self.sites) - set(SITES)
        if unknown:
            raise ValueError(f"unknown dropout sites {sorted(unknown)}; valid: {', '.join(SITES)}")


class _OutputDropout(nn.Module):
    """Dropout applied to a module's output through a forward hook (residual or embedding dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.0)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self.dropout(output[0]), *output[1:])
        return self.dropout(output)


ATTENTION_RATES = ("attention_dropout", "dropout")  # the float rate an attention module passes to its kernel


def dropout_sites(model: PreTrainedModel, kinds: list[str] | tuple[str, ...] = SITES) -> dict[str, list[Any]]:
    """The dropout sites of `model` by kind, found by structure (`workbench.models.structure`); adds an output
    dropout hook on each residual branch (and on the embeddings) that has no dropout module of its own."""
    found = model_sites(model)
    sites: dict[str, list[Any]] = {kind: [] for kind in SITES}
    added: dict[str, int] = {kind: 0 for kind in SITES}
    for layer in found.layers:
        sites["attention"] += layer.dropouts["attention"]
        rate = _attention_rate(layer.attention)
        if rate is not None:  # a rate the attention kernel reads
            sites["attention"].append((layer.attention, rate))
        for branch, kind in ((layer.attention_branch, "residual_attention"),
                             (layer.feed_forward_branch, "residual_feed_forward")):
            if layer.dropouts[kind]:
                sites["residual"] += layer.dropouts[kind]
            else:
                sites["residual"].append(_hook_output_dropout(branch, "workbench_output_dropout"))
                added["residual"] += 1
    sites["residual"] = list({id(site): site for site in sites["residual"]}.values())  # Phi: one for both branches
    sites["embedding"] = list(found.embedding_dropouts)
    if not sites["embedding"]:
        sites["embedding"].append(_hook_output_dropout(found.input_embeddings, "workbench_emb_dropout"))
        added["embedding"] += 1
    if "attention" in kinds and not sites["attention"]:
        raise SiteError(f"{found.model_class}: no attention dropout (a dropout module in the attention or its "
                        "`attention_dropout` rate) in its layers")
    print(f"[dropout_schedule] {len(found.layers)} layers: " + ", ".join(
        f"{kind} {len(sites[kind])}"
        + (f" ({added[kind]} added as output hook{'s' if added[kind] > 1 else ''})" if added[kind] else "")
        for kind in SITES))
    return sites


def _attention_rate(attention: nn.Module) -> str | None:
    """The attribute holding the rate an attention module passes to its kernel, if it has one."""
    return next((a for a in ATTENTION_RATES if isinstance(getattr(attention, a, None), float)), None)


def _hook_output_dropout(module: nn.Module, name: str) -> nn.Dropout:
    """Add dropout on `module`'s output; the Dropout is registered as a child so train()/eval() reach it."""
    hook = _OutputDropout()
    module.add_module(name, hook.dropout)
    module.register_forward_hook(hook)
    return hook.dropout


@register("dropout_schedule")
class DropoutSchedule(Method):
    Config = DropoutScheduleConfig
    logged_metrics = ("dropout_rate",)
    uses_sites = True

    @classmethod
    def check_sites(cls, config: DropoutScheduleConfig, sites: Any) -> None:
        if "attention" in config.sites and not any(
                layer.dropouts["attention"] or _attention_rate(layer.attention) for layer in sites.layers):
            raise ValueError("no attention dropout (a dropout module in the attention or its rate attribute "
                             f"{' / '.join(ATTENTION_RATES)}): leave 'attention' out of sites")

    def __init__(self, config: DropoutScheduleConfig | None = None) -> None:
        super().__init__(config)
        self.current_rate = 0.0
        self.switched_at: int | None = None
        self._sites: dict[str, list[Any]] = {}

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        self._sites = dropout_sites(model, self.config.sites)
        self.apply(0.0)
        return model

    def rate_at(self, step: int) -> float:
        """The rate for optimizer step `step` (0-based: the step about to be taken)."""
        return self.config.rate if step >= self.config.start_step else 0.0

    def apply(self, rate: float) -> None:
        for kind in self.config.sites:
            for site in self._sites.get(kind, []):
                if isinstance(site, nn.Dropout):
                    site.p = rate
                else:
                    module, attribute = site
                    setattr(module, attribute, rate)
        self.current_rate = rate

    def callbacks(self) -> list[TrainerCallback]:
        return [_ScheduleCallback(self)]

    def state_dict(self) -> dict[str, Any]:
        return {"current_rate": self.current_rate, "switched_at": -1 if self.switched_at is None else self.switched_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switched_at = None if state["switched_at"] < 0 else int(state["switched_at"])
        self.apply(float(state["current_rate"]))


class _ScheduleCallback(TrainerCallback):
    def __init__(self, method: DropoutSchedule) -> None:
        self.method = method

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        rate = self.method.rate_at(state.global_step)
        if rate != self.method.current_rate:
            self.method.apply(rate)
            if rate > 0 and self.method.switched_at is None:
                self.method.switched_at = state.global_step

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs["dropout_rate"] = self.method.current_rate


