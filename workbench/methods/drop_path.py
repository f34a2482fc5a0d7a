"""DropPath (stochastic depth, Huang et al. 2016), the regulariser "To Repeat or Not To Repeat" (Xue et al.,
NeurIPS 2023, Table 4) compares with dropout for multi-epoch training. During training every residual branch of
every decoder layer (its attention output and its MLP/MoE output, before they are added to the residual stream)
is dropped for a whole sequence at once (branches found by structure, `workbench.models.structure`: where a
family normalises a branch before the add, Gemma 2/3's and OLMo 2's post-norms, the normalised output):

    (1) h ← h + (m / (1 − p)) · f(h),   m ~ Bernoulli(1 − p), one draw per sequence and branch

so E[m / (1 − p)] = 1 and evaluation (eval mode) uses every branch unscaled. The draws come from torch's global
generator, which the run seeds; there is no state besides the rate.

    methods:
      drop_path: {rate: 0.1}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from workbench.methods import Method, register
from workbench.models.structure import model_sites


@dataclass
class DropPathConfig:
    rate: float = 0.1  # p of eq. (1), in [0, 1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")


class BranchDrop:
    """A forward hook: eq. (1) on a branch module's output (its first element when it returns a tuple)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or self.rate == 0.0:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 1)
        keep = torch.empty(shape, device=hidden.device, dtype=hidden.dtype).bernoulli_(1.0 - self.rate)
        dropped = hidden * keep / (1.0 - self.rate)
        return (dropped, *output[1:]) if isinstance(output, tuple) else dropped


@register("drop_path")
class DropPath(Method):
    Config = DropPathConfig
    logged_metrics = ()
    uses_sites = True  # the residual branches (every layer has two, or the model is refused)

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        sites = model_sites(model)  # every layer's two branches, or a SiteError naming what is missing
        branches = sites.branches
        print(f"[drop_path] {len(branches)} branches in {len(sites.layers)} layers (p = {self.config.rate})")
        for branch in branches:
            branch.register_forward_hook(BranchDrop(self.config.rate))
        return model
