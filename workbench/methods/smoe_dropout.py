"""SMoE-Dropout: a frozen random router over experts cut from the MLPs, with the number of active experts grown.

"Sparse MoE as the New Dropout: Scaling Dense and Self-Slimmable Transformers" (Chen et al., ICLR 2023; code
VITA-Group/Random-MoE-as-Dropout). Each chosen dense MLP becomes E experts of width d_ff/E (eqs. (1)-(7) in
`workbench/models/moe.py`); a frozen, randomly initialised router sends each token to its top k experts, and k
grows over training. At test time any k from 1 to E may be used ("self-slimmable"); k = E is the code's
score-based dense inference. Numbering continues `models/moe.py`; § are the project's spec `docs/specs/smoe_dropout.md` (its Corrections win):

    (8)  k(t) = clip(round((k_max − k_min)·t/T) + k_min, k_min, k_max)             `linear_increase` (§2.3)
    (9)  other modes (the code's `calculate_gate_number`; Python's round, half to even):
         linear_decrease   round((k_min − k_max)·t/T) + k_max
         cosine_increase   round((k_min − k_max)·cos(πt/2T)) + k_max
         cosine_decrease   round((k_max − k_min)·cos(πt/2T)) + k_min
         exp_increase      round((k_min − k_max)·0.99^⌊t/⌊T/300⌋⌋) + k_max
         multi_step_increase / _decrease   the levels 1, 2, 4, ..., E (E added if not a power of two), in order
                           or reversed, level ⌊L·t/T⌋ (the last one at t = T), clipped to [k_min, k_max]
         constant          k (the learned-router baseline, or a frozen router at fixed k)
    (10) loss (learned router only): L + λ · Σ_layers L_bal (eq. 6; summed over layers as the code does),
         normalised like a per-token term under gradient accumulation

t is the optimizer step about to be taken (`state.global_step`, 0-based) and T `schedule_steps`, default the
run's `max_steps`. Defaults follow the Corrections: experts 16, scratch experts (the paper trains them from
scratch; `init: split` converts a pretrained MLP), router N(0, 0.02) with zero bias and frozen, softmax over the k
selected logits with no rescale (`combine: softmax_topk`; under `init: split` the weights default to uniform 1/k, so
the conversion recipe below reproduces the dense model at k = E), k linear from E/2 to E (the released scripts' 8 → 16;
`k_min: 2` is the spec's second arm), all layers. Evaluation inside training runs at `eval_k` (default: E for the
random router, the code's dense inference; the learned router's own k).

    methods:
      smoe_dropout: {experts: 16}                                        # (C) frozen router, k 8 -> 16
      smoe_dropout: {experts: 16, k_min: 2}                              # (C') k 2 -> 16
      smoe_dropout: {experts: 16, schedule: constant, k: 16}             # (D) frozen router, all experts
      smoe_dropout: {experts: 16, router: learned, k: 2, balance_loss_weight: 0.01}   # (B) learned router
      smoe_dropout: {experts: 16, structured_dropout: 0.5}               # dense model, expert-sized chunk dropout
      smoe_dropout: {experts: 16, init: split, combine: scaled}          # convert a pretrained model (eq. 5)

State: none that is not a function of the step: k is recomputed from `global_step` at every step (the current k is
still saved and restored, so a resumed run logs the same k before its first step); the router and experts are
model weights, in the model's checkpoint. A converted model's checkpoint records the conversion in its config
(`config.smoe`) and reloads converted through `workbench.models.load_trained_model`; `set_active_experts(model, k)`
sets the k of a loaded model for a self-slimmable sweep.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, TrainerCallback

from workbench.errors import ConfigError, did_you_mean
from workbench.methods import Method, register
from workbench.models.moe import COMBINES, INITS, ROUTER_INITS, ROUTERS, WEIGHTS, MoEMLP
from workbench.models.moe_model import (
    add_chunk_dropout,
    broadcast_frozen_routers,
    convert_to_moe,
    expert_levels,
    expert_load,
    find_mlp_blocks,
    load_summary,
    moe_layers,
    set_active_experts,
)

__all__ = ["SCHEDULES", "SMoEDropout", "SMoEDropoutConfig", "scheduled_k", "set_active_experts"]

Schedule = Literal["linear_increase", "linear_decrease", "cosine_increase", "cosine_decrease", "exp_increase",
                   "multi_step_increase", "multi_step_decrease", "constant"]
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)


@dataclass
class SMoEDropoutConfig:
    experts: int = 16  # E: experts per MLP, each of width d_ff / E (must divide d_ff)
    layers: list[int] | None = None  # MLP blocks to convert, 0-based in model order (negative from the end); None: all
    init: Literal["scratch", "split"] = "scratch"  # independent random experts, or split a pretrained MLP (eq. 5)
    combine: Literal["softmax_topk", "scaled"] = "softmax_topk"  # eq. (4): c = 1 (code) or c = E (conversion)
    # eq. (3): softmax of the selected logits, or 1/k each; None: uniform under `init: split` (with `combine: scaled`
    # the converted model at k = E is then exactly the dense one), softmax otherwise (the paper's router)
    weights: Literal["softmax", "uniform"] | None = None
    router: Literal["random_frozen", "learned"] = "random_frozen"
    router_init: Literal["normal", "default"] = "normal"  # N(0, router_std), zero bias; or PyTorch's U(±1/√d)
    router_std: float = 0.02
    init_std: float | None = None  # scratch experts' std; None: the model config's initializer_range
    schedule: Schedule | None = None  # eqs. (8)-(9); None: constant for a learned router, else linear_increase
    k_min: int | None = None  # None: E // 2 (the released scripts' 8 of 16)
    k_max: int | None = None  # None: E
    k: int | None = None  # fixed k (`schedule: constant`); None there: 2 for a learned router, else k_max
    schedule_steps: int | None = None  # T of eqs. (8)-(9); None: the run's max_steps
    eval_k: int | None = None  # k in eval mode during training; None: E (frozen router) or k (learned router)
    balance_loss_weight: float = 0.0  # λ of eq. (10), learned router only (the code's --load_balance, default 0)
    structured_dropout: float = 0.0  # > 0: the dense baseline instead, expert-sized chunks dropped with this p
    structured_dropout_rescale: bool = False  # divide by 1 - p (the code does not)

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = "uniform" if self.init == "split" else "softmax"
        e = self.experts
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"experts must be an integer >= 1, got {e!r}")
        choices: dict[str, tuple[str, ...]] = {"init": INITS, "combine": COMBINES, "weights": WEIGHTS,
                                               "router": ROUTERS, "router_init": ROUTER_INITS, "schedule": SCHEDULES}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid and not (name == "schedule" and value is None):
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}"
                                 f"{did_you_mean(str(value), valid)}")
        for name in ("k_min", "k_max", "k", "eval_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= e):
                raise ValueError(f"{name} must be an integer in [1, experts] = [1, {e}], got {value!r}")
        if self.k_lo > self.k_hi:
            raise ValueError(f"k_min ({self.k_lo}) must be <= k_max ({self.k_hi})")
        if self.k is not None and self.mode != "constant":
            raise ValueError(f"k (a fixed k) needs schedule 'constant', got schedule {self.schedule!r}; or set "
                             f"k_min/k_max for the schedule")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule_steps must be >= 1, got {self.schedule_steps}")
        if not self.balance_loss_weight >= 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {self.balance_loss_weight}")
        if self.balance_loss_weight > 0 and self.router != "learned":
            raise ValueError("balance_loss_weight needs router 'learned': a frozen router's routing cannot change "
                             "(SMoE-Dropout has no balance loss)")
        if not 0.0 <= self.structured_dropout < 1.0:
            raise ValueError(f"structured_dropout must be in [0, 1), got {self.structured_dropout}")
        if not self.router_std > 0:
            raise ValueError(f"router_std must be > 0, got {self.router_std}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def mode(self) -> str:
        """The schedule: `schedule`, or its default (constant for a learned router or a fixed k, else linear)."""
        if self.schedule is not None:
            return self.schedule
        return "constant" if self.router == "learned" or self.k is not None else "linear_increase"

    @property
    def k_lo(self) -> int:
        return self.k_min if self.k_min is not None else max(1, self.experts // 2)

    @property
    def k_hi(self) -> int:
        return self.k_max if self.k_max is not None else self.experts

    @property
    def fixed_k(self) -> int:
        """The k of `schedule: constant`."""
        if self.k is not None:
            return self.k
        return min(2, self.experts) if self.router == "learned" else self.k_hi

    @property
    def inference_k(self) -> int | None:
        """k in eval mode (None: all experts)."""
        if self.eval_k is not None:
            return self.eval_k
        return self.fixed_k if self.router == "learned" else None


def scheduled_k(step: int, total_steps: int, mode: str, k_min: int, k_max: int, num_experts: int,
                k: int | None = None) -> int:
    """Eqs. (8)-(9): the k for optimizer step `step` (0-based) of a schedule over `total_steps` steps; steps past
    the end keep the end value. `k` is the constant schedule's value (default k_max)."""
    if mode not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {mode!r}{did_you_mean(mode, SCHEDULES)}")
    total = max(1, int(total_steps))
    t = min(max(0, int(step)), total)
    if mode == "constant":
        return k_max if k is None else k
    if mode == "linear_increase":
        value = round((k_max - k_min) * t / total) + k_min
    elif mode == "linear_decrease":
        value = round((k_min - k_max) * t / total) + k_max
    elif mode == "cosine_increase":
        value = round((k_min - k_max) * math.cos(math.pi * t / (2 * total))) + k_max
    elif mode == "cosine_decrease":
        value = round((k_max - k_min) * math.cos(math.pi * t / (2 * total))) + k_min
    elif mode == "exp_increase":
        value = round((k_min - k_max) * 0.99 ** (t // max(1, total // 300))) + k_max
    else:
        levels = expert_levels(num_experts)  # the levels a self-slimmable evaluation runs too
        if mode == "multi_step_decrease":
            levels = levels[::-1]
        value = levels[min(len(levels) - 1, int(len(levels) * t / total))]
    return int(min(max(value, k_min), k_max))


@register("smoe_dropout")
class SMoEDropout(Method):
    """SMoE-Dropout (or its learned-router / dense-dropout baselines): `prepare_model` converts the MLPs, the
    callback sets k at every step and logs it with the experts' load, `loss` adds the learned router's balance
    loss."""

    Config = SMoEDropoutConfig
    needs_full_finetuning = True  # the experts replace the MLP weights LoRA would adapt
    replaces = ("mlp",)
    uses_sites = True  # the dense MLPs it converts (found by structure, `workbench.models.structure`)
    logged_metrics = ("smoe_k", "smoe_load_min", "smoe_load_max", "smoe_load_cv", "smoe_balance_loss")

    def __init__(self, config: SMoEDropoutConfig | None = None) -> None:
        super().__init__(config)
        self.layers: list[MoEMLP] = []
        self.model: PreTrainedModel | None = None
        self.current_k: int | None = None
        self.balance_loss: torch.Tensor | None = None  # the last micro-batch's Σ_layers L_bal (unweighted)
        if not self.balances:
            # the loss hook would add nothing: let the trainer keep its own loss path (TRL's fused LM head)
            self.overrides = lambda hook: hook != "loss" and SMoEDropout.overrides(hook)  # type: ignore[method-assign]

    @classmethod
    def replaced_parts(cls, config: SMoEDropoutConfig) -> tuple[str, ...]:
        """The MLPs, unless `structured_dropout` keeps the model dense (a hook on each down projection)."""
        return () if config.structured_dropout > 0 else cls.replaces

    @property
    def balances(self) -> bool:
        return self.config.router == "learned" and self.config.balance_loss_weight > 0

    # --- the model ------------------------------------------------------------------------------------------
    @classmethod
    def check_sites(cls, config: SMoEDropoutConfig, sites: Any) -> None:
        dense = [layer for layer in sites.layers if layer.mlp is not None]
        if not dense:
            raise ValueError("no dense MLP to convert: its feed-forward blocks are mixtures of experts already")
        for layer in dense:
            if layer.mlp.width % config.experts:
                raise ValueError(f"experts ({config.experts}) must divide the MLP width {layer.mlp.width} of "
                                 f"layer {layer.index}")

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        """Convert the chosen MLPs (or, for `structured_dropout`, add the chunk dropout); a model that is already
        converted (an SMoE checkpoint as the base of the next run) keeps its experts and router weights and takes
        this config's router mode and combine rule. Under ZeRO-3 (partitioned parameters) the dense weights are
        gathered for `init: split`; the new parameters are partitioned by DeepSpeed when its engine starts."""
        cfg = self.config
        self.model = model
        try:
            if cfg.structured_dropout > 0:
                add_chunk_dropout(model, cfg.experts, cfg.structured_dropout, cfg.layers, cfg.structured_dropout_rescale)
                return model
            existing = moe_layers(model)
            if existing:
                self.layers = self._adopt(model, existing)
            else:
                self.layers = convert_to_moe(model, cfg.experts, layers=cfg.layers, init=cfg.init, combine=cfg.combine,
                                             weights=cfg.weights, router=cfg.router, router_init=cfg.router_init,
                                             router_std=cfg.router_std, init_std=cfg.init_std,
                                             eval_k=cfg.inference_k)
        except ValueError as err:
            message = str(err)
            field = ".layers" if message.startswith("layers") else ".experts" if message.startswith("num_experts") else ""
            raise ConfigError(f"field 'methods.{self.name}{field}': {err}") from None
        for layer in self.layers:
            layer.track_balance = self.balances
        blocks = find_mlp_blocks(model)
        print(f"[smoe_dropout] {len(self.layers)} of {len(blocks)} MLP blocks are mixtures of {cfg.experts} experts "
              f"(init {cfg.init}, combine {cfg.combine}, weights {cfg.weights}, router {cfg.router})")
        broadcast_frozen_routers(model)  # several ranks: rank 0's router on all (buffers are never broadcast)
        self.apply_k(self.k_at(0, cfg.schedule_steps or 1))
        return model

    def _adopt(self, model: PreTrainedModel, layers: list[MoEMLP]) -> list[MoEMLP]:
        cfg = self.config
        found = sorted({layer.num_experts for layer in layers})
        if found != [cfg.experts]:
            raise ValueError(f"the model is already converted with {found} experts per layer, not {cfg.experts}")
        for layer in layers:
            layer.set_router_mode(cfg.router)
            layer.combine, layer.weights, layer.eval_k = cfg.combine, cfg.weights, cfg.inference_k
        model.config.smoe = {**model.config.smoe, "combine": cfg.combine, "weights": cfg.weights,
                             "router": cfg.router, "eval_k": cfg.inference_k}
        return layers

    # --- k --------------------------------------------------------------------------------------------------
    def k_at(self, step: int, total_steps: int) -> int:
        """Eqs. (8)-(9) with this config's bounds."""
        cfg = self.config
        return scheduled_k(step, total_steps, cfg.mode, cfg.k_lo, cfg.k_hi, cfg.experts, cfg.fixed_k)

    def apply_k(self, k: int) -> None:
        """Training-mode k of every MoE layer (eval mode keeps `eval_k`)."""
        if self.layers:
            set_active_experts(self.model, k, evaluation=False)
        self.current_k = k

    def callbacks(self) -> list[TrainerCallback]:
        return [] if self.config.structured_dropout > 0 else [_KSchedule(self)]

    def statistics(self) -> dict[str, float]:
        """k, eq. (6)'s load over the training passes since the last call (min, max and coefficient of variation
        across experts, averaged over layers; balanced: 1/E, 1/E, 0), and the last balance loss."""
        stats: dict[str, float] = {}
        if self.current_k is not None:
            stats["smoe_k"] = float(self.current_k)
        load = expert_load(self.model, reset=True) if self.layers else None
        if load is not None:
            stats.update(load_summary(load, "smoe_load"))
        if self.balance_loss is not None:
            stats["smoe_balance_loss"] = self.balance_loss.item()
        return stats

    # --- loss -----------------------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any, loss: torch.Tensor,
             num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Eq. (10). L_bal is a mean over this micro-batch's tokens; with `num_items_in_batch` it is weighted by the
        micro-batch's share of the label tokens, so that accumulated micro-batches add up to one mean."""
        if not self.balances:
            return loss
        terms = [layer.aux_loss for layer in self.layers if layer.aux_loss is not None]
        for layer in self.layers:
            layer.aux_loss = None
        if not terms:
            return loss
        balance = torch.stack(terms).sum()
        self.balance_loss = balance.detach()
        if num_items_in_batch is not None and inputs.get("labels") is not None:
            labels = inputs["labels"]
            shifts = not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
            items = (labels[..., 1:] if shifts else labels).ne(-100).sum()
            balance = balance * items / num_items_in_batch
        return loss + self.config.balance_loss_weight * balance.to(loss.dtype)

    # --- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"k": -1 if self.current_k is None else self.current_k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("k", -1)) > 0 and self.layers:
            self.apply_k(int(state["k"]))


class _KSchedule(TrainerCallback):
    """k from the step at the start of every optimizer step; k and the experts' load in the logs."""

    def __init__(self, method: SMoEDropout) -> None:
        self.method = method

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        total = self.method.config.schedule_steps or state.max_steps
        k = self.method.k_at(state.global_step, total)
        if k != self.method.current_k:
            self.method.apply_k(k)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs.update(self.method.statistics())
