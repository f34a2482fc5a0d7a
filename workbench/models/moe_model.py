"""SMoE layers inside a whole model: converting its dense MLPs, reloading converted checkpoints, the number of
active experts, the experts' load (also of other models' learned routers, `RouterLoadCallback`), and the
structured dense-dropout baseline. The layer itself and the equations
(1)-(7) are in `workbench/models/moe.py`.

Blocks replaced are found by structure (`workbench.models.structure.MLPParts`): the module holding exactly the
MLP's parts becomes the MoE layer (GPT-NeoX's, Llama's, Phi-3's `mlp`); where the parts share a module with
others, the up projection (with its activation's module: BERT's `intermediate`) becomes the MoE layer and the
activation and down projection after it identities (GPT-2's `c_fc`, `act`, `c_proj`; OPT's `fc1`,
`activation_fn`, `fc2`; BERT's `output.dense`), so the dropout, residual and LayerNorm that followed still follow.

Checkpoints: the conversion is recorded in `config.smoe` (config.json) and the model's class becomes a subclass of
its own (`SMoE<Class>`) whose constructor re-applies it, so `save_pretrained`/`from_pretrained` of that class, the
workbench loader (`moe_model_class`) and the Trainer's resume all rebuild the converted architecture before the
weights are read; every weight then comes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from workbench.collectives import broadcast_from
from workbench.distributed import gathered_parameters
from workbench.models.moe import INITS, ROUTER_INITS, MoEMLP, _check_choice, expert_counts
from workbench.models.structure import MLPParts, model_sites, unwrapped

__all__ = ["ROUTER_LOAD_METRICS", "ChunkDropout", "MLPBlock", "RouterLoadCallback", "load_summary", "add_chunk_dropout", "broadcast_frozen_routers", "convert_to_moe",
           "expert_levels", "expert_load", "find_mlp_blocks", "is_moe_checkpoint", "mean_active_fraction", "moe_config",
           "moe_layers", "moe_model_class", "restore_moe_layers", "runnable_expert_counts", "set_active_experts",
           "zero3_init"]


# --- finding and replacing dense MLPs ---------------------------------------------------------------------
@dataclass
class MLPBlock:
    """One dense MLP of a model (or the MoE layer that replaced it), in model order; found by structure
    (`workbench.models.structure`), so GPT-2's Conv1D, OPT's layer-level `fc1`/`fc2`, Phi-3's fused gate-up and
    BERT's intermediate/output split are all blocks."""

    index: int
    name: str  # dotted name of the module that is (or was) replaced: the MLP's container
    kind: str  # "dense" or "moe" (converted)
    module: nn.Module
    parts: MLPParts
    owner: nn.Module  # the model the names are relative to (a LoRA wrapper's base model)


def find_mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    """Every dense MLP (or already converted MoE layer) of `model`, in the order of its layers; a native MoE
    layer (Mixtral's, Qwen-MoE's experts) is not a block."""
    owner = unwrapped(model)
    blocks: list[MLPBlock] = []
    for layer in model_sites(owner).layers:
        if layer.mlp is None:
            continue
        container = owner.get_submodule(layer.mlp.container)
        kind = "moe" if isinstance(container, MoEMLP) else "dense"
        blocks.append(MLPBlock(len(blocks), layer.mlp.container, kind, container, layer.mlp, owner))
    return blocks


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also under ZeRO-3 (where `param.shape` is a placeholder's)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _dense_parts(block: MLPBlock) -> dict[str, Any]:
    """The linear layers and activation of a dense block: up (d_ff x d, or 2 d_ff x d fused with the gate first),
    optional gate, down (d x d_ff), and the activation module."""
    get, parts = block.owner.get_submodule, block.parts
    return {"up": get(parts.up), "gate": get(parts.gate) if parts.gate else None, "down": get(parts.down),
            "act": get(parts.act) if parts.act else None, "fused": parts.fused_gate_up}


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear map's weight in PyTorch's (out, in) layout (transformers' Conv1D stores (in, out))."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _dense_weights(parts: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """The (gathered) dense MLP as `MoEMLP.load_dense` takes it: w_in, w_gate (d_ff, d), w_out (d, d_ff), biases;
    a fused gate-up weight is split, its first half the gate."""
    up, gate, down = parts["up"], parts["gate"], parts["down"]
    w_in, b_in = _linear_weight(up), up.bias
    w_gate, b_gate = (_linear_weight(gate), gate.bias) if gate is not None else (None, None)
    if parts["fused"]:
        w_gate, w_in = w_in.chunk(2, dim=0)
        b_gate, b_in = b_in.chunk(2) if b_in is not None else (None, None)
    return {"w_in": w_in, "b_in": b_in, "w_out": _linear_weight(down), "b_out": down.bias, "w_gate": w_gate,
            "b_gate": b_gate}


def _select(blocks: list[MLPBlock], layers: list[int] | None) -> list[MLPBlock]:
    if layers is None:
        return blocks
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -len(blocks) <= i < len(blocks):
            raise ValueError(f"layers: {i!r} is not an MLP block index of this model (it has {len(blocks)})")
        chosen.append(blocks[i])
    if len({b.index for b in chosen}) != len(chosen):
        raise ValueError(f"layers: {layers} names a block twice")
    return sorted(chosen, key=lambda b: b.index)


def convert_to_moe(model: nn.Module, num_experts: int, *, layers: list[int] | None = None, init: str = "scratch",
                   combine: str = "softmax_topk", weights: str = "softmax", router: str = "random_frozen",
                   router_init: str = "normal", router_std: float = 0.02, init_std: float | None = None,
                   k: int | None = None, eval_k: int | None = None) -> list[MoEMLP]:
    """Replace the dense MLPs of `layers` (indices into `find_mlp_blocks`, None: all) by `MoEMLP`s of `num_experts`
    experts; record the conversion in `model.config.smoe` and give the model its `SMoE<Class>` class so that
    checkpoints reload converted. `init`: `scratch` (independent N(0, init_std) experts, zero biases; init_std
    defaults to the config's initializer_range, else 0.02) or `split` (eq. 5). Under ZeRO-3 each new layer is
    built partitioned (`zero3_init`) and filled while gathered, layer by layer, so no rank ever holds more than
    one layer's full experts (and, for `split`, its dense MLP); every rank calls it. Raises ValueError naming the
    argument at fault."""
    _check_choice("init", init, INITS)
    _check_choice("router_init", router_init, ROUTER_INITS)
    blocks = find_mlp_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no dense MLP blocks (its layers' feed-forward blocks are "
                         "already mixtures of experts)")
    if any(b.kind == "moe" for b in blocks):
        raise ValueError(f"{type(model).__name__} already has MoE layers (config.smoe = {_smoe(model)})")
    chosen = _select(blocks, layers)
    config = getattr(model, "config", None)
    std = init_std if init_std is not None else float(getattr(config, "initializer_range", 0.02) or 0.02)
    converted = []
    for block in chosen:
        parts = _dense_parts(block)
        up, down = parts["up"], parts["down"]
        d_ff, d_model = block.parts.width, _shape(down.weight)[0 if isinstance(down, nn.Linear) else 1]
        if d_ff % num_experts or num_experts < 1:
            raise ValueError(f"num_experts ({num_experts}) must divide the MLP width d_ff ({d_ff}) of block "
                             f"{block.index} ('{block.name}')")
        with zero3_init():
            moe = MoEMLP(d_model, d_ff, num_experts, parts["act"], gated=block.parts.gated,
                         bias_in=up.bias is not None, bias_out=down.bias is not None, combine=combine,
                         weights=weights, router=router, k=k, eval_k=eval_k, device=up.weight.device,
                         dtype=up.weight.dtype).train(block.module.training)
        _fill_experts(moe, parts, init, std, router_init, router_std)
        _replace(block, moe)
        converted.append(moe)
    if config is not None:
        config.smoe = {"num_experts": num_experts, "layers": [b.index for b in chosen], "combine": combine,
                       "weights": weights, "router": router, "eval_k": eval_k}
    if hasattr(type(model), "from_pretrained") and config is not None:  # a transformers model: reloads converted
        model.__class__ = moe_model_class(type(model))
    return converted


def zero3_init() -> contextlib.AbstractContextManager[Any]:
    """Under ZeRO-3 (a DeepSpeed config that transformers knows of, `is_deepspeed_zero3_enabled`), the context in
    which new modules' parameters are partitioned across the ranks as each module is built
    (`deepspeed.zero.Init`), so no rank holds more than one new module's full parameters; otherwise, or inside
    such a context already (`from_pretrained` builds the model in one), nothing."""
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero import partition_parameters

    nested = partition_parameters.zero_init_context > 0  # the enclosing Init partitions them (no nested pinning)
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(), enabled=not nested)


def _fill_experts(moe: MoEMLP, parts: dict[str, Any], init: str, std: float, router_init: str,
                  router_std: float) -> None:
    """The new layer's values: eq. (5) from the dense block (`split`) or N(0, std) experts (`scratch`), and the
    router. Under ZeRO-3 the layer's parameters (and, for `split`, the dense block's) are gathered whole while
    rank 0's values are written, then partitioned again: one layer's full weights at a time (a collective)."""
    with gathered_parameters(list(moe.parameters()), modify=True):
        if init == "split":
            dense = [p for key in ("up", "gate", "down") if parts[key] is not None for p in parts[key].parameters()]
            with gathered_parameters(dense):
                moe.load_dense(**_dense_weights(parts))
        else:
            moe.init_scratch(std)
        moe.init_router(router_init, router_std)


def _replace(block: MLPBlock, moe: MoEMLP) -> None:
    """Put `moe` where the block's container was; the parts after it outside the container (GPT-2's and OPT's
    activation and down projection, BERT's `output.dense`) become identities, so what followed them (dropout,
    residual, LayerNorm) now follows the MoE layer, which holds b2 in its experts."""
    for name in (block.name, *block.parts.bypassed):
        parent_name, _, attr = name.rpartition(".")
        parent = block.owner.get_submodule(parent_name) if parent_name else block.owner
        setattr(parent, attr, moe if name == block.name else nn.Identity())


def _smoe(model: nn.Module) -> dict[str, Any] | None:
    return getattr(getattr(model, "config", None), "smoe", None)


def restore_moe_layers(model: nn.Module) -> list[MoEMLP]:
    """Re-apply the conversion recorded in `model.config.smoe` to a model built from that config (experts
    initialised from scratch, a no-op inside `from_pretrained`: the checkpoint's weights are loaded next). A model
    without `config.smoe`, or already converted, is left as it is."""
    smoe = _smoe(model)
    if not smoe or moe_layers(model):
        return moe_layers(model)
    return convert_to_moe(model, int(smoe["num_experts"]), layers=list(smoe["layers"]), init="scratch",
                          combine=smoe.get("combine", "softmax_topk"), weights=smoe.get("weights", "softmax"),
                          router=smoe.get("router", "random_frozen"), eval_k=smoe.get("eval_k"))


# --- the model class that reloads converted ------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def moe_model_class(model_class: type, config: Any = None) -> type:
    """The class that builds a converted model: `SMoE<model_class>`, whose constructor re-applies `config.smoe`.

    With `config` given, `model_class` may be an Auto class (resolved through its mapping) and is returned
    unchanged when the config records no conversion, so a loader can always write
    `moe_model_class(AutoModelForCausalLM, config).from_pretrained(path)`."""
    if config is not None:
        if not getattr(config, "smoe", None):
            return model_class
        mapping = getattr(model_class, "_model_mapping", None)
        if mapping is not None:
            model_class = mapping[type(config)]
            if isinstance(model_class, (list, tuple)):
                model_class = model_class[0]
    if getattr(model_class, "_workbench_smoe", False):
        return model_class
    if model_class not in _CLASSES:
        base = model_class

        def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, config, *args, **kwargs)
            restore_moe_layers(self)

        name = f"SMoE{base.__name__}"
        cls = type(name, (base,), {"__init__": __init__, "_workbench_smoe": True, "__module__": __name__,
                                   "__qualname__": name, "__doc__": f"{base.__name__} with SMoE MLP layers."})
        globals()[name] = cls  # importable by name (pickle)
        _register_weight_renaming(base.__name__, name)
        _CLASSES[base] = cls
    return _CLASSES[model_class]


def moe_config(path: str | Path) -> dict[str, Any] | None:
    """The conversion a model folder's config.json records (`smoe`: num_experts, layers, ...); None for a dense
    model or a folder without a readable config.json (a hub name)."""
    config = Path(path).expanduser() / "config.json"
    try:
        return json.loads(config.read_text()).get("smoe") or None
    except (OSError, ValueError, AttributeError):
        return None


def _register_weight_renaming(base: str, name: str) -> None:
    """Give `SMoE<base>` the checkpoint key renaming transformers keeps per class name (GPT-NeoX: `embed_out.` ->
    `lm_head.`), so that it loads what `<base>` saved: an untied head converted after `from_pretrained` is saved
    under the old name."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers: no per-class renaming
        return
    mapping = get_checkpoint_conversion_mapping(base)
    if mapping is not None:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


def is_moe_checkpoint(path: str | Path) -> bool:
    """Whether the model folder at `path` holds a converted model (config.json records `smoe`)."""
    return moe_config(path) is not None


# --- inference k and statistics -----------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


@torch.no_grad()
def broadcast_frozen_routers(model: nn.Module) -> int:
    """Give every rank rank 0's frozen routers (buffers: DeepSpeed broadcasts or partitions parameters from
    rank 0, never buffers), so that all ranks route alike whatever their random state. Does nothing outside a
    multi-rank process group; a collective otherwise. Returns the number of layers broadcast."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 0
    layers = [layer for layer in moe_layers(model) if layer.router_mode == "random_frozen"]
    for layer in layers:
        for buffer in (layer.router_weight, layer.router_bias):
            buffer.copy_(broadcast_from(buffer, source=0))  # on the backend's device (the rank's GPU under NCCL)
    return len(layers)


def expert_levels(num_experts: int) -> list[int]:
    """1, 2, 4, ... up to E (E appended when it is not a power of two): the k of a self-slimmable evaluation
    (`eval.experts: all`; the code's [1, 2, 4, 8, 16] for E = 16), and the levels of SMoE-Dropout's multi-step
    k schedules."""
    levels = [2**i for i in range(num_experts.bit_length()) if 2**i <= num_experts]
    return levels if levels[-1] == num_experts else [*levels, num_experts]


def runnable_expert_counts(model_or_checkpoint: nn.Module | str | Path) -> list[int]:
    """The numbers of active experts per token a converted SMoE model can run at (`set_active_experts`): 1 to E;
    [] for a dense model. Given a model folder, read from its config.json (`moe_config`), loading no weights."""
    if isinstance(model_or_checkpoint, nn.Module):
        smoe = _smoe(model_or_checkpoint)
    else:
        smoe = moe_config(model_or_checkpoint)
    return list(range(1, int(smoe["num_experts"]) + 1)) if smoe else []


def set_active_experts(model: nn.Module, k: int | None, *, training: bool = True, evaluation: bool = True) -> int:
    """Use k experts per token in every MoE layer (None: all E), in training mode and/or eval mode (the
    self-slimmable evaluation: k ∈ {1, 2, 4, ..., E} on a loaded model). Returns the number of layers set;
    ValueError for a model without MoE layers or k outside [1, E]."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to set k on")
    for layer in layers:
        if training:
            layer.k = layer.num_experts if k is None else k
        if evaluation:
            layer.eval_k = k
    return len(layers)


def expert_load(model: nn.Module, reset: bool = True) -> torch.Tensor | None:
    """Eq. (6): the mean fraction of token assignments each expert got, per MoE layer, over the training passes
    since the last reset, shape (layers, E) (rows sum to 1); None if there was no training pass."""
    layers = moe_layers(model)
    loads = []
    for layer in layers:
        if reset:
            load = layer.pop_load()
        else:
            load = None if layer._load_sum is None else layer._load_sum / layer._load_passes
        if load is None:
            return None
        loads.append(load)
    return _to_host(loads) if loads else None


def _to_host(rows: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Equal-length device tensors as one (len, n) CPU tensor of `dtype`, in one transfer (one wait for the
    device)."""
    device = rows[0].device
    return torch.stack([row.to(device, dtype) for row in rows]).cpu()


# --- the structured dense-dropout baseline --------------------------------------------------------------
class ChunkDropout(nn.Module):
    """Eq. (7): zero expert-sized, strided chunks of a dense MLP's hidden units in training mode (unit i belongs to
    chunk i mod E, as `torch.rand(E).gt(p).repeat(H)` in the code); one draw per forward pass, shared by its
    tokens; no 1/(1-p) rescale unless `rescale`."""

    def __init__(self, d_ff: int, num_chunks: int, p: float, rescale: bool = False) -> None:
        super().__init__()
        if num_chunks < 1 or d_ff % num_chunks:
            raise ValueError(f"num_experts ({num_chunks}) must divide the MLP width d_ff ({d_ff})")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"structured_dropout must be in [0, 1), got {p}")
        self.d_ff, self.num_chunks, self.p, self.rescale = d_ff, num_chunks, p, rescale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return hidden
        keep = torch.rand(self.num_chunks, device=hidden.device).gt(self.p)
        mask = keep.repeat(self.d_ff // self.num_chunks).to(hidden.dtype)
        if self.rescale:
            mask = mask / (1.0 - self.p)
        return hidden * mask

    def extra_repr(self) -> str:
        return f"d_ff={self.d_ff}, chunks={self.num_chunks}, p={self.p}, rescale={self.rescale}"


def add_chunk_dropout(model: nn.Module, num_experts: int, p: float, layers: list[int] | None = None,
                      rescale: bool = False) -> list[ChunkDropout]:
    """Eq. (7) on the dense MLPs of `layers` (None: all): a pre-hook on each down projection masks its input
    (the hidden units; exact for activations with act(0) = 0, as masking W1's rows, b1 and W2's columns in the
    code). The architecture and its checkpoints stay dense."""
    blocks = [b for b in _select(find_mlp_blocks(model), layers) if b.kind != "moe"]
    added = []
    for block in blocks:
        down = _dense_parts(block)["down"]
        chunk = ChunkDropout(block.parts.width, num_experts, p, rescale)
        down.add_module("workbench_chunk_dropout", chunk)  # a child, so train()/eval() reach it
        down.register_forward_pre_hook(lambda module, args, chunk=chunk: (chunk(args[0]), *args[1:]))
        added.append(chunk)
    return added


def mean_active_fraction(ks: list[int], num_experts: int) -> float:
    """Mean k/E over steps: the fraction of the dense MLP's FLOPs the experts spend (router and scatter aside)."""
    return math.fsum(ks) / (len(ks) * num_experts) if ks else 1.0


def load_summary(load: torch.Tensor, prefix: str) -> dict[str, float]:
    """`<prefix>_min`, `_max`, `_cv` of a (layers, experts) load: across experts, averaged over layers (balanced:
    1/E, 1/E, 0; all on one expert: 0, 1, √(E−1))."""
    return {f"{prefix}_min": load.min(dim=1).values.mean().item(), f"{prefix}_max": load.max(dim=1).values.mean().item(),
            f"{prefix}_cv": (load.std(dim=1, unbiased=False) / load.mean(dim=1)).mean().item()}


# --- routed experts of other models (transformers' Mixtral, Qwen-MoE): their load ---------------------------------
ROUTER_LOAD_METRICS = ("router_load_min", "router_load_max", "router_load_cv")


class RouterLoadCallback(TrainerCallback):
    """Eq. (6)'s load f_e of a model's own learned routers (a router module returning (logits, weights, indices),
    as transformers' `MixtralTopKRouter` does), counted over the training passes between two logs and logged as
    `router_load_min`, `router_load_max` and `router_load_cv` (across experts, averaged over layers; balanced:
    1/E, 1/E, 0; collapsed onto one expert: 0, 1, √(E−1)). Does nothing for a model without such routers."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}  # per router: assignments per expert, on the router's device

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        if model is None or self.counts:
            return
        for index, module in enumerate(m for m in model.modules() if type(m).__name__.endswith("Router")):
            experts = int(getattr(module, "num_experts", None) or module.weight.shape[0])
            if experts < 2:  # a dense twin's one-expert router: nothing to balance
                continue
            self.counts[index] = torch.zeros(experts, dtype=torch.long)
            module.register_forward_hook(self._counter(index))

    def _counter(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module.training and isinstance(output, tuple) and len(output) >= 3:
                chosen = output[2].detach().reshape(-1).long()
                counts = self.counts[index]
                if counts.device != chosen.device:  # first call: the counts move to the router's device
                    counts = self.counts[index] = counts.to(chosen.device)
                counts += expert_counts(chosen, counts.numel())  # on the device: no wait for the host
        return hook

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self.counts:
            return
        counts = _to_host(list(self.counts.values()), torch.float64)
        for device_counts in self.counts.values():
            device_counts.zero_()
        counts = counts[counts.sum(1) > 0]
        if len(counts):
            logs.update(load_summary(counts / counts.sum(1, keepdim=True), "router_load"))
