"""Training FLOPs by the 6N rule (Kaplan et al. 2020, Sec. 2.1), with only the experts a token uses counted.

`6 * active_parameters * tokens` per step: non-embedding parameters, plus the output projection when it is
tied to the input embedding (its matmul still runs), with each mixture-of-experts layer's expert weights
scaled by k/E, the experts a token uses over the experts there are: `num_experts_per_tok / num_local_experts`
for a model built with experts (Mixtral), and the current `active_k / num_experts` of each `MoEMLP` (a model
converted by `models.moe`, e.g. SMoE-Dropout, whose k follows a schedule: the count changes during training).
A frozen router's weights are buffers, not parameters; its matmul runs, so they are counted as active. For an
encoder-decoder the tokens are the encoder's input tokens (an approximation). Attention's sequence-length term
is left out, as in the 6N rule. Element counts use ZeRO-3's `ds_numel` where a parameter is partitioned.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from workbench.models.moe import MoEMLP
from workbench.models.moe_model import moe_layers


def _numel(tensor) -> int:
    """A tensor's element count, also under ZeRO-3 (where a partitioned parameter's own `numel()` is 0)."""
    return int(getattr(tensor, "ds_numel", tensor.numel()))


def inactive_expert_parameters(expert_weights: int, top_k: int, experts: int) -> int:
    """Of `expert_weights` expert parameters, the ones a token does not pass through with top-k of E experts."""
    return round(expert_weights * (1 - top_k / experts)) if experts > top_k else 0


def _moe_layer_parameters(layer: MoEMLP) -> tuple[int, int]:
    """(expert parameters, router buffers) of a converted layer; a learned router's parameters are counted by
    `num_parameters` already."""
    experts = sum(_numel(p) for name, p in layer.named_parameters() if not name.startswith("router_"))
    router = sum(_numel(b) for name, b in layer.named_buffers() if name.startswith("router_"))
    return experts, router


def active_parameters(model: PreTrainedModel) -> int:
    """Parameters one token passes through in a forward pass now (see module docstring): for a converted model
    it depends on the layers' current k (training or eval mode)."""
    config = model.config  # non-embedding parameters: num_parameters(exclude_embeddings=True), ZeRO-3 aware
    embeddings = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    active = sum(_numel(p) for name, p in model.named_parameters() if name not in embeddings)
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        active += _numel(model.get_output_embeddings().weight)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:
        expert_weights = sum(_numel(p) for name, p in model.named_parameters() if ".experts." in name)
        active -= inactive_expert_parameters(expert_weights, top_k, experts)
    for layer in moe_layers(model):
        weights, router = _moe_layer_parameters(layer)
        active += router - inactive_expert_parameters(weights, layer.active_k, layer.num_experts)
    return active


def active_experts_key(model: nn.Module) -> tuple[int, ...]:
    """The current k of every `MoEMLP` (empty for other models): `active_parameters` is a function of the model's
    architecture and this key, so a caller may cache it per key."""
    return tuple(layer.active_k for layer in moe_layers(model))


def training_flops(active: int, tokens: int) -> int:
    """FLOPs of one forward and backward pass of `tokens` tokens through `active` active parameters (6N)."""
    return 6 * active * tokens


class FlopCounter:
    """FLOPs of a training step through any model: `training_flops` of its `active_parameters`, computed once
    per k of its MoE layers (a dense model has one value; a converted SMoE model one per k of its schedule).
    The model's MoE layers are found at the first call: the trainer builds the counter after every method has
    changed the model."""

    def __init__(self) -> None:
        self._active: dict[tuple[int, ...], int] = {}
        self._layers: list[MoEMLP] | None = None

    def __call__(self, model: PreTrainedModel, tokens: int) -> int:
        if self._layers is None:
            self._layers = moe_layers(model)
        key = tuple(layer.active_k for layer in self._layers)  # `active_experts_key`, without a walk per step
        if key not in self._active:
            self._active[key] = active_parameters(model)
        return training_flops(self._active[key], tokens)
