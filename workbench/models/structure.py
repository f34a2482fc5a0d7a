"""Where methods act in a model, found from its structure: layers, residual branches, MLP parts, embeddings.

Every method asks this module; none keeps a list of module names. The answer comes from what transformers
exposes and from the model's own forward:

- **layers**: the `nn.ModuleList` whose entries are the model's `_no_split_modules` class (the decoder or encoder
  layer transformers never splits across devices), one per `num_hidden_layers` of the (text) config; for a
  class without `_no_split_modules` (DistilBERT, ELECTRA), the one list of `num_hidden_layers` alike blocks;
- **a data-flow trace**: the model's class is built from its config on the `meta` device (no memory, no
  weights) and runs one forward on four token ids with hooks on every module of its layers. Inside each layer:
    * the *attention* is the outermost module carrying transformers' attention-interface flag `is_causal` (a
      model whose attention lacks it, MPT, XGLM or BLOOM, is refused);
    * a *residual branch* is the outermost module whose output has the layer's hidden shape and that no other
      module of the layer reads: it goes into the residual add (or the layer's own post-norm). That is the
      attention output (or, in Gemma 2/3 and OLMo 2, the norm applied to it; in GPT-NeoX and Phi-3 the dropout
      after it), and the MLP or MoE output (OPT's `fc2`, BERT's output dropout). The branch reached from the
      attention's output is the attention branch, the other the feed-forward branch;
    * the *MLP parts* are the layer's linear maps (`nn.Linear` or transformers' `Conv1D`) outside the
      attention: `down` maps the MLP width f to d, `up` maps d to f (or d to 2f: a fused gate-up whose first half
      is the gate, transformers' `chunk(2)` convention), a separate `gate` is the d-to-f map whose output the
      activation module reads; a feed-forward branch holding 3-D expert weights or several `down` maps is MoE;
- **embeddings**: `get_input_embeddings()`, `get_output_embeddings()`, tied when they share one weight.

The trace gives dotted names, which are then looked up in the model itself, so the answer also holds for a
LoRA-wrapped model (PEFT keeps the names), a ZeRO-3-partitioned one (nothing is gathered) and an SMoE-converted
one (`MoEMLP` where the dense MLP was). A model whose structure does not fit is a `SiteError`: one line naming the
model class and what is missing.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["LayerSites", "MLPParts", "ModelSites", "SiteError", "model_sites", "traced_sites"]


class SiteError(ValueError):
    """A model whose structure does not give a method the sites it needs (one line: class and what is missing)."""


@dataclass(frozen=True)
class MLPParts:
    """The dense MLP of one layer, by dotted name (relative to the model returned by `unwrapped`).

    `up` maps d -> f (d -> 2f when `fused_gate_up`: gate first); `gate` is a separate d -> f map (None: not
    gated); `down` maps f -> d; `act` the activation module (None where the activation is a function).
    `container` is the module a conversion replaces by one MoE layer (it computes the whole MLP); `bypassed` are
    the parts outside it that then become identities (in forward order)."""

    up: str
    down: str
    gate: str | None
    act: str | None
    fused_gate_up: bool
    width: int  # f, the MLP's inner width
    container: str
    bypassed: tuple[str, ...] = ()

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


@dataclass
class LayerSites:
    """One decoder (or encoder) layer and the places in it that methods act on."""

    index: int
    name: str
    module: nn.Module
    attention: nn.Module
    attention_name: str
    attention_branch: nn.Module  # the module whose output is the attention's residual branch
    feed_forward_branch: nn.Module  # the same for the MLP or MoE block
    branch_names: tuple[str, str]
    is_moe: bool
    mlp: MLPParts | None  # None for a MoE layer
    # by what they drop: "attention" (probabilities), "residual_attention" / "residual_feed_forward" (a branch's
    # output), "other"
    dropouts: dict[str, list[nn.Dropout]] = field(default_factory=dict)

    @property
    def branches(self) -> list[nn.Module]:
        return [self.attention_branch, self.feed_forward_branch]


@dataclass
class ModelSites:
    """The sites of a whole model (see the module docstring for how each is found)."""

    model_class: str
    layers_name: str
    layers: list[LayerSites]
    hidden_size: int
    input_embeddings: nn.Module
    output_embeddings: nn.Module | None
    tied: bool
    embedding_dropouts: list[nn.Dropout]  # dropout modules between the embeddings and the first layer

    @property
    def branches(self) -> list[nn.Module]:
        return [branch for layer in self.layers for branch in layer.branches]

    def describe(self) -> str:
        """E.g. `12 layers, 24 residual branches, 12 dense MLPs (gated), untied embeddings`."""
        moe = sum(layer.is_moe for layer in self.layers)
        dense = [layer.mlp for layer in self.layers if layer.mlp is not None]
        kinds = sorted({("fused gate-up" if p.fused_gate_up else "gated") if p.gated else "plain" for p in dense})
        parts = [f"{len(self.layers)} layers", f"{len(self.branches)} residual branches"]
        if dense:
            parts.append(f"{len(dense)} dense MLPs ({', '.join(kinds)})")
        if moe:
            parts.append(f"{moe} MoE blocks")
        parts.append("no output embeddings" if self.output_embeddings is None
                     else "tied embeddings" if self.tied else "untied embeddings")
        return ", ".join(parts)


# --- the public entry point ----------------------------------------------------------------------------------
_TRACES: weakref.WeakKeyDictionary[nn.Module, _Trace] = weakref.WeakKeyDictionary()


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def model_sites(model: nn.Module) -> ModelSites:
    """The sites of `model` (a transformers model, possibly LoRA-wrapped, SMoE-converted or ZeRO-3 partitioned).
    Raises SiteError naming the model class and what is missing."""
    base = unwrapped(model)
    trace = _TRACES.get(base)
    if trace is None:
        trace = _TRACES[base] = _trace(base)
    return _resolve(base, trace)


def traced_sites(config: Any, model_class: type) -> ModelSites:
    """The sites of a `model_class` model with `config`, built on the meta device (no weights are read): what a
    run's model will have, known before any data are prepared."""
    with torch.device("meta"):
        model = model_class(_probe_config(config))
    return model_sites(model)


# --- the trace -------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    order: int
    name: str
    inputs: list[torch.Tensor]
    output: torch.Tensor | None
    leaf: bool

    @property
    def passes_through(self) -> bool:
        """Whether the module returned one of its inputs (dropout in eval mode): it neither reads nor makes."""
        return any(t is self.output for t in self.inputs)


@dataclass
class _Trace:
    """Names found by tracing one meta forward (the part of the answer that does not depend on weights)."""

    layers_name: str
    layers: list[dict[str, Any]]
    embedding_dropouts: list[str]
    hidden_size: int


def _first_tensor(value: Any) -> torch.Tensor | None:
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)) and value and torch.is_tensor(value[0]):
        return value[0]
    return getattr(value, "last_hidden_state", None) if not isinstance(value, (tuple, list, dict)) else None


def _probe_config(config: Any) -> Any:
    probe = copy.deepcopy(config)
    if hasattr(probe, "smoe"):  # an SMoE-converted model: trace the dense architecture it was converted from
        del probe.smoe
    for config in {id(c): c for c in (probe, probe.get_text_config())}.values():
        config.use_cache = True  # no packed-sequence check of the position ids (it reads them)
    return probe


def _no_padding_check(config: Any) -> None:
    """After the probe is built (RoBERTa's embeddings take their padding index from the config then): no padding
    check of the (meta) ids at forward time, which would read their values."""
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        part.pad_token_id = None


def _probe_class(model: nn.Module) -> type:
    cls = type(model)
    while getattr(cls, "_workbench_smoe", False):
        cls = cls.__bases__[0]
    return cls


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of the model's `_no_split_modules` layers, one per `num_hidden_layers`."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module)
             and all(type(entry).__name__ in kinds for entry in module)]
    if not found:  # no `_no_split_modules` (DistilBERT, ELECTRA): a list of num_hidden_layers alike blocks
        found = [(name, module) for name, module in model.named_modules()
                 if isinstance(module, nn.ModuleList) and len(module) == expected
                 and len({type(entry) for entry in module}) == 1 and list(module[0].children())]
    if not found:
        raise SiteError(f"{type(model).__name__}: no list of its layers ({', '.join(sorted(kinds)) or 'no '}"
                        "_no_split_modules) found")
    if len(found) > 1:
        raise SiteError(f"{type(model).__name__}: {len(found)} layer stacks ({', '.join(n for n, _ in found)}); "
                        "encoder-decoder models are not supported by the methods that need layer sites")
    name, layers = found[0]
    if expected is not None and len(layers) != expected:
        raise SiteError(f"{type(model).__name__}: '{name}' has {len(layers)} layers, its config "
                        f"num_hidden_layers {expected}")
    return name, layers


def _trace(model: nn.Module) -> _Trace:
    """Trace a meta copy of `model`'s architecture (same class and config) through one forward."""
    layers_name, _ = _layer_list(model)
    config = _probe_config(model.config)
    try:
        with _outside_zero_init(), torch.device("meta"):
            probe = _probe_class(model)(config)
        probe = probe.to(torch.bfloat16).eval()  # bf16: the grouped expert matmuls of MoE families need it
        _no_padding_check(probe.config)
    except Exception as err:  # noqa: BLE001 - any failure to build the probe is reported with the class
        raise SiteError(f"{type(model).__name__}: cannot be built on the meta device to find its sites "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    calls: list[_Call] = []
    handles = []
    for name, module in probe.named_modules():
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any, name: str = name) -> None:
            inputs = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
            leaf = not list(module.children())
            calls.append(_Call(len(calls), name, inputs, _first_tensor(output), leaf))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            probe(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    except Exception as err:  # noqa: BLE001
        raise SiteError(f"{type(model).__name__}: its forward cannot be traced on the meta device "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    finally:
        for handle in handles:
            handle.remove()
    layer_list = probe.get_submodule(layers_name)
    layers = [_layer_trace(probe, f"{layers_name}.{i}", calls) for i in range(len(layer_list))]
    first = min(c.order for c in calls if c.name == f"{layers_name}.0")
    embedding_dropouts = [c.name for c in calls if c.order < first and not _inside(c.name, layers_name)
                          and isinstance(probe.get_submodule(c.name), nn.Dropout)]
    hidden = layers[0]["hidden_size"]
    return _Trace(layers_name, layers, embedding_dropouts, hidden)


@contextlib.contextmanager
def _outside_zero_init() -> Iterator[None]:
    """Build the probe outside DeepSpeed's `zero.Init` when one is active (an SMoE checkpoint re-applies its
    conversion, and so traces, inside `from_pretrained` under ZeRO-3): the meta copy is not to be partitioned."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and zero.top_level_context is not None
    if active:
        zero.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero.restore_init_context()


def _outermost(calls: list[_Call]) -> dict[int, _Call]:
    """For each output tensor, the call of the outermost module that returned it."""
    producer: dict[int, _Call] = {}
    for call in calls:
        if call.output is None or call.passes_through:
            continue
        known = producer.get(id(call.output))
        if known is None or call.name.count(".") < known.name.count("."):
            producer[id(call.output)] = call
    return producer


def _inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


def _layer_trace(probe: nn.Module, prefix: str, calls: list[_Call]) -> dict[str, Any]:
    """The names of one layer's sites, from its calls in the trace (see the module docstring)."""
    cls = type(probe).__name__
    own = [c for c in calls if c.name == prefix]
    if not own:
        raise SiteError(f"{cls}: layer '{prefix}' was not called in the traced forward")
    layer_call = own[0]
    inner = [c for c in calls if _inside(c.name, prefix)]
    hidden_in = next((t for t in layer_call.inputs if t.dim() == 3), None)
    if hidden_in is None:
        raise SiteError(f"{cls}: layer '{prefix}' has no (batch, length, hidden) input")
    shape = tuple(hidden_in.shape)
    attentions = [c.name for c in inner if isinstance(getattr(probe.get_submodule(c.name), "is_causal", None), bool)]
    attentions = sorted({n for n in attentions if not any(_inside(n, a) for a in attentions)})
    if len(attentions) != 1:
        raise SiteError(f"{cls}: layer '{prefix}' has {len(attentions)} attention modules (modules with "
                        "transformers' `is_causal` flag), not 1")
    attention = attentions[0]
    producer = _outermost(inner)
    read = {id(t) for c in inner if not c.passes_through for t in c.inputs}
    layer_out = id(layer_call.output) if layer_call.output is not None else None
    sinks = [c for key, c in producer.items()
             if c.output.shape[-1] == shape[-1] and c.output.numel() == hidden_in.numel() and key not in read and key != layer_out
             and key != id(hidden_in) and not _inside(c.name, attention)]
    sinks = sorted((c for c in sinks if not any(_inside(c.name, s.name) for s in sinks)), key=lambda c: c.order)
    downstream = _downstream(inner, attention)
    attention_sinks = [c for c in sinks if id(c.output) in downstream]
    feed_forward_sinks = [c for c in sinks if id(c.output) not in downstream]
    if len(attention_sinks) != 1 or len(feed_forward_sinks) != 1:
        raise SiteError(f"{cls}: layer '{prefix}' has {len(attention_sinks)} attention and "
                        f"{len(feed_forward_sinks)} feed-forward residual branches, not 1 and 1")
    attention_branch, feed_forward_branch = attention_sinks[0].name, feed_forward_sinks[0].name
    dropouts = _dropout_kinds(probe, prefix, inner, attention, (attention_branch, feed_forward_branch), downstream)
    is_moe, mlp = _feed_forward(probe, prefix, inner, attention, feed_forward_branch, shape[-1], dropouts["other"])
    return {"name": prefix, "attention": attention, "branches": (attention_branch, feed_forward_branch),
            "is_moe": is_moe, "mlp": mlp, "hidden_size": shape[-1], "dropouts": dropouts}


def _downstream(inner: list[_Call], attention: str) -> set[int]:
    """Ids of the tensors computed from the attention module's output through leaf modules alone (a container
    such as BERT's `BertSelfOutput` also reads the residual stream, which is not the branch)."""
    start = [c for c in inner if c.name == attention and c.output is not None]
    reached = {id(c.output) for c in start}
    for call in sorted(inner, key=lambda c: c.order):
        if call.output is not None and call.leaf and any(id(t) in reached for t in call.inputs):
            reached.add(id(call.output))
    return reached


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear map (`nn.Linear` or transformers' `Conv1D`, whose weight is (in, out))."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if isinstance(module, Conv1D):
        return shape[0], shape[1]
    if isinstance(module, nn.Linear):
        return shape[1], shape[0]
    return None


def _feed_forward(probe: nn.Module, prefix: str, inner: list[_Call], attention: str, branch: str, hidden: int,
                  inner_dropouts: list[str]) -> tuple[bool, MLPParts | None]:
    """Whether the feed-forward branch is MoE, and the dense MLP's parts."""
    cls = type(probe).__name__
    region = [c for c in inner if not _inside(c.name, attention) and c.name != attention]
    names = list(dict.fromkeys(c.name for c in region))
    branch_module = probe.get_submodule(branch)
    if any(p.dim() == 3 for p in branch_module.parameters()):  # experts stored as one (E, ., .) weight
        return True, None
    linears = {n: _linear_shape(probe.get_submodule(n)) for n in names}
    linears = {n: s for n, s in linears.items() if s is not None}
    downs = [n for n, (i, o) in linears.items() if o == hidden and i != hidden]
    if len(downs) > 1:
        return True, None
    if not downs:
        raise SiteError(f"{cls}: layer '{prefix}' has no MLP down-projection (a linear map from the MLP width to "
                        f"{hidden})")
    down = downs[0]
    width = linears[down][0]
    ins = [n for n, (i, o) in linears.items() if i == hidden and o in (width, 2 * width) and n != down]
    passing = {c.name for c in region if c.passes_through}  # nn.Identity and the like: no activation
    activations = [n for n in names if not list(probe.get_submodule(n).parameters()) and n not in passing
                   and not isinstance(probe.get_submodule(n), nn.Dropout) and not list(probe.get_submodule(n).children())]
    readers = {n: {id(t) for c in region if c.name == n for t in c.inputs} for n in activations}
    outputs = {n: {id(c.output) for c in region if c.name == n and c.output is not None} for n in ins}
    act_of = {n: next((a for a in activations if readers[a] & outputs[n]), None) for n in ins}
    fused = [n for n in ins if linears[n][1] == 2 * width]
    if len(ins) == 1 and fused:
        up, gate, act = fused[0], None, (activations[0] if len(activations) == 1 else None)
    elif len(ins) == 1:
        up, gate, act = ins[0], None, act_of[ins[0]]
    elif len(ins) == 2 and sum(act_of[n] is not None for n in ins) == 1:
        gate = next(n for n in ins if act_of[n] is not None)
        up, act = next(n for n in ins if n != gate), act_of[gate]
    else:
        raise SiteError(f"{cls}: layer '{prefix}' has {len(ins)} MLP input projections ({', '.join(ins) or 'none'}); "
                        "expected an up projection, optionally with a gate or fused gate-up")
    fused_gate_up = bool(fused) and up == fused[0]
    container, bypassed = _container(probe, prefix, up, gate, act, down, set(inner_dropouts))
    return False, MLPParts(up, down, gate, act, fused_gate_up, width, container, bypassed)


def _leaves(module: nn.Module, name: str) -> set[str]:
    return {f"{name}.{n}" if n else name for n, m in module.named_modules() if not list(m.children())}


def _container(probe: nn.Module, prefix: str, up: str, gate: str | None, act: str | None, down: str,
               inner_dropouts: set[str]) -> tuple[str, tuple[str, ...]]:
    """The module a conversion replaces: the smallest module below the layer holding exactly the MLP's parts
    (and dropouts inside the MLP, on neither branch: T5's, ModernBERT's; the MoE layer has none), or else the
    largest holding `up` (and the activation) alone, with the parts after it bypassed."""
    parts = {p for p in (up, gate, act, down) if p is not None}
    ancestor = up
    while "." in ancestor[len(prefix) + 1:]:
        ancestor = ancestor.rsplit(".", 1)[0]
        if parts <= _leaves(probe.get_submodule(ancestor), ancestor) <= parts | inner_dropouts:
            return ancestor, ()
    if gate is not None or act is None:
        raise SiteError(f"{type(probe).__name__}: layer '{prefix}' has its MLP parts ({', '.join(sorted(parts))}) "
                        "spread over modules that also hold other parts; it cannot be replaced as one block")
    container = up
    while "." in container[len(prefix) + 1:]:
        parent = container.rsplit(".", 1)[0]
        if not _leaves(probe.get_submodule(parent), parent) <= {up, act}:
            break
        container = parent
    bypassed = tuple(p for p in (act, down) if not _inside(p, container))
    return container, bypassed


def _dropout_kinds(probe: nn.Module, prefix: str, inner: list[_Call], attention: str, branches: tuple[str, str],
                   downstream: set[int]) -> dict[str, list[str]]:
    """The layer's dropout modules by what they drop: attention probabilities, one of the residual branches, or
    something else (a dropout the attention never calls, passing its rate to the kernel, is an attention one)."""
    branch_outputs = {id(c.output) for c in inner if c.name in branches and c.output is not None}
    attention_outputs = {id(c.output) for c in inner if c.name == attention and c.output is not None}
    kinds: dict[str, list[str]] = {"attention": [], "residual_attention": [], "residual_feed_forward": [],
                                   "other": []}
    layer = probe.get_submodule(prefix)
    for name in (f"{prefix}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Dropout)):
        outs = {id(c.output) for c in inner if c.name == name and c.output is not None}
        on_branch = outs & (branch_outputs | attention_outputs)
        if on_branch:  # one module may drop both branches (Phi's `resid_dropout`): it is in both kinds
            if on_branch & downstream:
                kinds["residual_attention"].append(name)
            if on_branch - downstream:
                kinds["residual_feed_forward"].append(name)
        elif _inside(name, attention):  # also when the attention passes its rate to a kernel (not called)
            kinds["attention"].append(name)
        else:
            kinds["other"].append(name)
    return kinds


# --- from names to the model's own modules -------------------------------------------------------------------
def _resolve(model: nn.Module, trace: _Trace) -> ModelSites:
    layers = []
    for index, names in enumerate(trace.layers):
        module = model.get_submodule(names["name"])
        attention_branch, feed_forward_branch = (model.get_submodule(n) for n in names["branches"])
        is_moe = names["is_moe"] or _is_converted(model, names["mlp"])
        layers.append(LayerSites(
            index, names["name"], module, model.get_submodule(names["attention"]), names["attention"],
            attention_branch, feed_forward_branch, names["branches"], is_moe, names["mlp"],
            {kind: [model.get_submodule(n) for n in found] for kind, found in names["dropouts"].items()}))
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
    return ModelSites(type(model).__name__, trace.layers_name, layers, trace.hidden_size, input_embeddings,
                      output_embeddings, tied, [model.get_submodule(n) for n in trace.embedding_dropouts])


def _is_converted(model: nn.Module, mlp: MLPParts | None) -> bool:
    """Whether SMoE-Dropout replaced this dense MLP (an `MoEMLP` now sits at its container)."""
    if mlp is None:
        return False
    from workbench.models.moe import MoEMLP

    try:
        return isinstance(model.get_submodule(mlp.container), MoEMLP)
    except AttributeError:
        return False
