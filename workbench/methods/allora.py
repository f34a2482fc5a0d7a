"""ALLoRA: LoRA without dropout and scaling, with a per-row coefficient from the current weights.

"ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws" (Huang & Balestriero, arXiv 2410.09692). The paper's
own equation numbers were not retrieved, so the equations are numbered here, as in docs/methods/allora.md; the
sections cited are the project's ALLoRA spec `docs/specs/allora.md` (§1.2, and its Corrections, which win where they differ).
PyTorch/PEFT notation: W₀ ∈ R^{out×in}, A ∈ R^{r×in}, B ∈ R^{out×r} (B starts at 0), ΔW = BA, and δ = ∂L/∂y the
error at the output of the LoRA branch y = B(Ax).

    (1) forward, no dropout and no α/r scaling:   h = W₀x + B(Ax)                                  (§1.2 step 1)
    (2) row norm of the product:                  n_i = ‖(BA)_{i,:}‖₂,  n_i² = B_{i,:} (A Aᵀ) B_{i,:}ᵀ  (§1.2 step 3)
    (3) coefficient:                              c_i = 1 / sqrt(n_i + 1/η²)          (default, Corrections)
                                                  c_i = 1 / sqrt(n_i² + 1/η²)         (`squared_norm`, §1.2 step 3)
    (4) `apply: gradient`:                        ∂L/∂B = diag(c) δᵀ(Ax),  ∂L/∂A = Bᵀ diag(c) δᵀx,
                                                  ∂L/∂x = δBA, unscaled                 (Corrections, first item)
    (5) `apply: update`:                          B_{i,:} ← B_{i,:} + c_i · (optimizer's step of B_{i,:})
                                                                                  (§1.2 step 5, Corrections)

η defaults to α/r of the LoRA config (plain LoRA is W₀ + η·BA, Corrections), so c = η at B = 0: the first steps
match plain LoRA's gradient on B, and as a row grows c_i falls like 1/sqrt(n_i). `row_axis: input` uses the columns
of BA instead (the paper's "rows" under row-vector math xW): n_j = ‖(BA)_{:,j}‖₂, and in (4) x̃ = x·diag(c) stands
for x in both weight gradients; in (5) the columns of A take the multiplier.

c is computed from the weights the step's gradient is taken at (the pre-step weights) in both variants, every
optimizer step, in fp32: in the forward pass for `gradient` (the model's copy: bf16 under DeepSpeed bf16), from the
optimizer's fp32 copy before the step for `update` (under DeepSpeed's ZeRO-0 fp16 optimizer too: the callback
links its masters, `workbench.distributed.link_master_copies`). The update variant fetches every layer's factors
with one collective per process group before the step and the stepped factors with one after it (not one per
layer), and holds them in fp32 meanwhile: about 3 x 4 bytes per LoRA parameter on every rank, briefly.

Under Adam the gradient variant on B is largely undone: row i of B's gradient is c_i times plain LoRA's, and Adam
divides a slowly varying per-coordinate scale back out; only A's gradient, Bᵀ diag(c) δᵀx, is reweighted. The
update variant (the literal "adaptive learning rate") multiplies the optimizer's step itself; the factor that does
not carry the row (A for output rows) keeps the optimizer's step, since each of its entries feeds every row of BA.

    model:
      lora: {r: 8, lora_alpha: 16, lora_dropout: 0}     # η = 16/8 = 2; the forward runs at scaling 1
    methods:
      allora: {apply: gradient}                         # or update; row_axis, squared_norm, eta, allow_dropout

The method keeps no state across steps (c is recomputed from the weights), so resuming needs nothing from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from transformers import PreTrainedModel, TrainerCallback

from workbench.distributed import full_parameters, is_partitioned, link_master_copies, set_full_parameters
from workbench.errors import ConfigError, did_you_mean
from workbench.methods import Method, register

APPLY = ("gradient", "update")
ROW_AXES = ("output", "input")


@dataclass
class AlloraConfig:
    apply: Literal["gradient", "update"] = "gradient"  # (4) scale A's and B's gradients, or (5) the optimizer's step
    row_axis: Literal["output", "input"] = "output"  # rows of BA (PyTorch out x in) or its input columns
    squared_norm: bool = False  # c = 1/sqrt(n^2 + 1/eta^2) instead of 1/sqrt(n + 1/eta^2)
    eta: float | None = None  # c at B = 0; None: alpha/r of each adapted layer's LoRA config (16/8 = 2)
    allow_dropout: bool = False  # keep model.lora.lora_dropout > 0 (the spec's p = 0.05 arm); else an error

    def __post_init__(self) -> None:
        for name, valid in (("apply", APPLY), ("row_axis", ROW_AXES)):
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}{did_you_mean(str(value), valid)}")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")


def row_norms(weight_a: torch.Tensor, weight_b: torch.Tensor, row_axis: str = "output") -> torch.Tensor:
    """Eq. (2): ‖(BA)_{i,:}‖₂ for each output row (`output`) or ‖(BA)_{:,j}‖₂ for each input column (`input`), in
    fp32, through the r x r Gram matrix of the other factor rather than BA itself."""
    a, b = weight_a.detach().float(), weight_b.detach().float()
    squared = ((b @ (a @ a.T)) * b).sum(1) if row_axis == "output" else (((b.T @ b) @ a) * a).sum(0)
    return squared.clamp_min(0).sqrt()


def coefficients(norms: torch.Tensor, eta: float, squared_norm: bool = False) -> torch.Tensor:
    """Eq. (3): c = 1/sqrt(n + 1/η²), or 1/sqrt(n² + 1/η²) with `squared_norm`; c = η where n = 0."""
    return torch.rsqrt((norms.square() if squared_norm else norms) + 1.0 / eta**2)


def _outer(grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Σ over every token of grad ⊗ value: the weight gradient of a linear map from `value` to `grad`'s space."""
    return grad.reshape(-1, grad.shape[-1]).T @ value.reshape(-1, value.shape[-1])


class ReweightedLoraBranch(torch.autograd.Function):
    """y = B(Ax) whose backward is eq. (4): A and B get the gradients of the c-weighted rows, x the plain one.

    `output_rows`: δ·diag(c) replaces δ in ∂L/∂A and ∂L/∂B (c over out); else x·diag(c) replaces x there (c over
    in). ∂L/∂x = δBA either way, so layers below see plain LoRA's gradient (not a hook on y, which would scale it).
    Runs inside autograd, so DeepSpeed's gradient partitioning and reduction see the reweighted gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                coefficient: torch.Tensor, output_rows: bool) -> torch.Tensor:
        hidden = F.linear(x, weight_a)
        ctx.save_for_backward(x, hidden, weight_a, weight_b, coefficient)
        ctx.output_rows, ctx.dtypes = output_rows, (weight_a.dtype, weight_b.dtype)
        return F.linear(hidden, weight_b)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, hidden, weight_a, weight_b, coefficient = (t.to(grad_y.dtype) for t in ctx.saved_tensors)
        grad_hidden = grad_y @ weight_b
        grad_x = grad_hidden @ weight_a if ctx.needs_input_grad[0] else None
        if ctx.output_rows:
            weighted = grad_y * coefficient
            grad_a, grad_b = _outer(weighted @ weight_b, x), _outer(weighted, hidden)
        else:
            weighted = x * coefficient
            grad_a, grad_b = _outer(grad_hidden, weighted), _outer(grad_y, F.linear(weighted, weight_a))
        grad_a = grad_a.to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        grad_b = grad_b.to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None


@dataclass(eq=False)
class AdaptedLayer:
    """One LoRA layer (adapter) ALLoRA acts on: its η and the coefficients of the last step it took."""

    name: str
    module: LoraLinear
    adapter: str
    eta: float
    coefficient: torch.Tensor | None = None  # c of the last step
    ba_norm: torch.Tensor | None = None  # ‖BA‖_F of the last step

    @property
    def weight_a(self) -> torch.nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def weight_b(self) -> torch.nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    def coefficients(self, weight_a: torch.Tensor, weight_b: torch.Tensor, config: AlloraConfig) -> torch.Tensor:
        """Eqs. (2)-(3) for these factor values, kept as the layer's latest c and ‖BA‖_F (the logged statistics)."""
        norms = row_norms(weight_a, weight_b, config.row_axis)
        self.coefficient = coefficients(norms, self.eta, config.squared_norm)
        self.ba_norm = norms.square().sum().sqrt()
        return self.coefficient


class _GradientVariant(LoraVariant):
    """The `apply: gradient` forward of one PEFT LoRA layer (PEFT calls it in place of its own LoRA branch)."""

    def __init__(self, layer: AdaptedLayer, config: AlloraConfig) -> None:
        self.layer, self.config = layer, config

    def forward(self, module: LoraLinear, *, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        x = module.lora_dropout[active_adapter](x)
        if not (torch.is_grad_enabled() and module.training):  # no backward: PEFT's plain branch, at scaling 1
            return result + module.lora_B[active_adapter](module.lora_A[active_adapter](x))
        weight_a, weight_b = self.layer.weight_a, self.layer.weight_b
        c = self.layer.coefficients(weight_a, weight_b, self.config)
        return result + ReweightedLoraBranch.apply(x, weight_a, weight_b, c, self.config.row_axis == "output")

    # merging is plain LoRA's (scaling is 1): PEFT hands merges to the variant while it is installed
    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def lora_conflict(lora: Mapping[str, Any], config: AlloraConfig) -> tuple[str, str] | None:
    """The LoRA option (a `peft.LoraConfig` field) ALLoRA cannot run with, and why; None when they fit."""
    if lora.get("use_dora"):
        return "use_dora", "ALLoRA is plain LoRA plus per-row coefficients, not DoRA (a baseline of its own): remove use_dora"
    if lora.get("use_rslora"):
        return "use_rslora", "ALLoRA runs at scaling 1 and takes eta = lora_alpha/r into its coefficient: remove use_rslora"
    if lora.get("lora_bias"):
        return "lora_bias", "ALLoRA's coefficients are defined for the factors A and B only: set lora_bias: false"
    if (lora.get("lora_dropout") or 0) > 0 and not config.allow_dropout:
        return "lora_dropout", (f"ALLoRA is dropout-free: set lora_dropout: 0 (got {lora['lora_dropout']}), or "
                                "methods.allora.allow_dropout: true for a run with dropout")
    return None


def adapted_layers(model: torch.nn.Module, config: AlloraConfig) -> list[AdaptedLayer]:
    """Every active LoRA adapter of `model` with its η (`config.eta`, else its layer's α/r), its scaling set to 1
    and the saved adapter config made to match (lora_alpha = r), so that a reloaded or merged adapter computes
    what was trained. ConfigError for a model without LoRA or with options ALLoRA does not fit."""
    peft_configs = getattr(model, "peft_config", None) or {}
    if not peft_configs:
        raise ConfigError("field 'model.lora': ALLoRA trains LoRA adapters and this model has none (set model.lora)")
    for lora in peft_configs.values():
        problem = lora_conflict(vars(lora), config)
        if problem:
            raise ConfigError(f"field 'model.lora.{problem[0]}': {problem[1]}")
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise ConfigError(f"field 'model.lora.target_modules': ALLoRA adapts linear layers; '{name}' is a "
                              f"{type(module).__name__}")
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if adapter in module.lora_variant:
                raise ConfigError(f"field 'model.lora': ALLoRA runs on plain LoRA; '{name}' uses the LoRA variant "
                                  f"{type(module.lora_variant[adapter]).__name__}")
            eta = config.eta if config.eta is not None else float(module.scaling[adapter])
            module.scaling[adapter] = 1.0
            layers.append(AdaptedLayer(name, module, adapter, eta))
    for lora in peft_configs.values():
        lora.lora_alpha, lora.alpha_pattern = lora.r, dict(lora.rank_pattern)
    return layers


@register("allora")
class Allora(Method):
    """ALLoRA on a PEFT LoRA model: `prepare_model` sets it up, `callbacks()` recompute c every step, apply the
    update variant and log c; both are plain PEFT / `transformers` objects, usable in any `Trainer`."""

    Config = AlloraConfig
    needs_lora = True
    logged_metrics = ("allora_c_min", "allora_c_median", "allora_c_max", "allora_ba_norm")

    def __init__(self, config: AlloraConfig | None = None) -> None:
        super().__init__(config)
        self.layers: list[AdaptedLayer] = []
        self._before_step: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def check_lora(cls, config: AlloraConfig, lora: dict[str, Any] | None) -> None:
        if lora is None:
            raise ValueError(f"[methods.{cls.name}] ALLoRA trains LoRA adapters: set model.lora (e.g. "
                             "{r: 8, lora_alpha: 16, lora_dropout: 0})")
        problem = lora_conflict(lora, config)
        if problem:
            raise ValueError(f"[model.lora.{problem[0]}] {problem[1]}")

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        self.layers = adapted_layers(model, self.config)
        etas = ", ".join(f"{eta:g}" for eta in sorted({layer.eta for layer in self.layers}))
        print(f"[allora] {len(self.layers)} adapted linear layers (eta {etas}), applied to the {self.config.apply}")
        if self.config.apply == "gradient":
            for layer in self.layers:
                layer.module.lora_variant[layer.adapter] = _GradientVariant(layer, self.config)
        return model

    def callbacks(self) -> list[TrainerCallback]:
        return [_AlloraCallback(self)]

    def register_partitioned_factors(self) -> None:
        """Under ZeRO-3, gather A and B with their LoRA layer: the gradient variant reads them in that layer's
        forward and backward, outside the forward of the `nn.Linear`s that own them (DeepSpeed's documented way;
        DeepSpeed 0.19 would otherwise register them itself on first use, as "dangling" parameters)."""
        if self.config.apply != "gradient" or not any(is_partitioned(layer.weight_a) for layer in self.layers):
            return
        import deepspeed

        for layer in self.layers:
            for param in (layer.weight_a, layer.weight_b):
                deepspeed.zero.register_external_parameter(layer.module, param)

    def before_step(self) -> None:
        """`apply: update`: every layer's factors as the optimizer holds them before the step (fp32 masters under
        DeepSpeed), all fetched by one collective per process group whatever the number of layers (every rank)."""
        values = full_parameters([p for layer in self.layers for p in (layer.weight_a, layer.weight_b)])
        self._before_step = list(zip(values[0::2], values[1::2], strict=True))

    def stepped_factors(self) -> list[torch.nn.Parameter]:
        """The factor whose step eq. (5) rescales, per layer: B (output rows) or A (input columns)."""
        return [layer.weight_b if self.config.row_axis == "output" else layer.weight_a for layer in self.layers]

    def rescale_step(self) -> None:
        """Eq. (5): the optimizer's step of each row of B (output rows) or column of A (input columns) times c,
        with c from the weights before the step; written to the optimizer's master copy and the model's. One
        collective per process group fetches every stepped factor; the rest is local on every rank, which all
        compute the same values from the same gathered factors."""
        output_rows = self.config.row_axis == "output"
        factors = self.stepped_factors()
        rescaled = []
        for layer, (weight_a, weight_b), after in zip(self.layers, self._before_step, full_parameters(factors),
                                                      strict=True):
            c = layer.coefficients(weight_a, weight_b, self.config)
            before, scale = (weight_b, c[:, None]) if output_rows else (weight_a, c)
            rescaled.append(before + scale * (after - before))
        set_full_parameters(factors, rescaled)
        self._before_step = []

    def statistics(self) -> dict[str, float]:
        """c over every row of every adapted layer at the last step (min, median, max) and ‖BA‖_F averaged over
        the layers; empty before the first training step."""
        stepped = [layer for layer in self.layers if layer.coefficient is not None]
        if not stepped:
            return {}
        device = stepped[0].coefficient.device  # one transfer to the host for all layers
        c = torch.cat([layer.coefficient.detach().float().to(device) for layer in stepped]).cpu()
        ba_norm = torch.stack([layer.ba_norm.detach().float().to(device) for layer in stepped]).mean().cpu()
        return {"allora_c_min": c.min().item(), "allora_c_median": c.quantile(0.5).item(),
                "allora_c_max": c.max().item(), "allora_ba_norm": ba_norm.item()}


class _AlloraCallback(TrainerCallback):
    """ZeRO-3 registration at the start, the update variant around each optimizer step, c's statistics in the logs."""

    def __init__(self, method: Allora) -> None:
        self.method = method

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.method.register_partitioned_factors()
        if self.method.config.apply == "update":  # DeepSpeed's ZeRO-0 fp16 optimizer: its fp32 masters
            link_master_copies(kwargs.get("optimizer"))

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        if self.method.config.apply == "update":
            self.method.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs: Any) -> None:
        if self.method.config.apply == "update":
            self.method.rescale_step()

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs.update(self.method.statistics())
