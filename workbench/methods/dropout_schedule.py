"""Dropout as a schedule: a fixed rate from the start, or "dropstage" (off, then on from a given step).

"To Repeat or Not To Repeat" (Xue et al., NeurIPS 2023, Sec. 5 and Fig. 8) finds dropout the one effective
remedy for multi-epoch degradation, and that switching it on only partway through training (dropstage)
reaches the same final value while training faster early. This method sets the rate of every dropout
site of the model at each step:

- `attention`: the attention-probability dropout (the `attention_dropout` attribute of attention modules);
- `residual`: dropout on each sublayer's output before it is added to the residual stream: the model's own
  `nn.Dropout` modules where it has them (GPT-NeoX's post-attention/post-MLP dropout, T5's), or, for families
  without them (Llama, Mixtral, Qwen-MoE), hooks on every decoder layer's attention (`self_attn`) and MLP or MoE
  block (`mlp`, `block_sparse_moe`) outputs. Never on the layer's output, which is the residual stream itself:
  dropping that would compound over the layers;
- `embedding`: dropout on the token-embedding output (`nn.Dropout` named like `emb*`, else a hook).

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

SITES = ("attention", "residual", "embedding")
SUBLAYERS = ("self_attn", "attention", "mlp", "block_sparse_moe")  # a decoder layer's residual branches


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


def dropout_sites(model: PreTrainedModel) -> dict[str, list[Any]]:
    """The dropout sites of `model` by kind; adds output-dropout hooks where a family has none."""
    sites: dict[str, list[Any]] = {kind: [] for kind in SITES}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            sites["embedding" if "emb" in name.rsplit(".", 1)[-1] else "residual"].append(module)
        elif isinstance(getattr(module, "attention_dropout", None), float):
            sites["attention"].append(module)
    if not sites["residual"]:
        for branch in residual_branches(model):
            sites["residual"].append(_hook_output_dropout(branch, "workbench_output_dropout"))
    if not sites["embedding"]:
        sites["embedding"].append(_hook_output_dropout(model.get_input_embeddings(), "workbench_emb_dropout"))
    return sites


def residual_branches(model: PreTrainedModel) -> list[nn.Module]:
    """Every decoder layer's attention and MLP/MoE modules, whose outputs are added to the residual stream
    (GPT-NeoX `attention`/`mlp`, Llama/Mixtral/Qwen `self_attn`/`mlp`); [] for other architectures."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None) or getattr(getattr(model, "base_model", model), "layers", None) or []
    return [getattr(layer, name) for layer in layers for name in SUBLAYERS
            if isinstance(getattr(layer, name, None), nn.Module)]


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

    def __init__(self, config: DropoutScheduleConfig | None = None) -> None:
        super().__init__(config)
        self.current_rate = 0.0
        self.switched_at: int | None = None
        self._sites: dict[str, list[Any]] = {}

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        self._sites = dropout_sites(model)
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
                    site.attention_dropout = rate
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


