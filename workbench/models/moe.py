"""Mixture-of-experts MLPs cut from a dense MLP (SMoE-Dropout, Chen et al., ICLR 2023): the model side.

A dense MLP of width d_ff becomes E experts of width H = d_ff/E with, together, the dense MLP's parameters. The
project's SMoE-Dropout spec (`shared/methods/smoe_dropout.md`, its Corrections win) and the official code
(VITA-Group/Random-MoE-as-Dropout) define, per token x ∈ R^d (numbering ours):

    (1) expert e:     E_e(x) = W2_e · act(W1_e x + b1_e) + b2_e          (GPT-NeoX, BERT: ReLU/GELU MLPs)
                      E_e(x) = W2_e · (act(Wg_e x + bg_e) ⊙ (W1_e x + b1_e)) + b2_e        (Llama: SwiGLU)
    (2) router:       g(x) = W_r x + b_r,  W_r ~ N(0, 0.02), b_r = 0, frozen: persistent buffers, saved in
                      checkpoints and outside autograd and every optimizer (`router_init: default`: PyTorch's
                      nn.Linear init, U(±1/√d); `router: learned`: parameters)
    (3) selection:    I = topk(g(x), k),  w = softmax(g_I(x)) over the k selected logits only
                      (`weights: uniform`: w_e = 1/k, the code's unused `dense_moe_flag`)
    (4) combination:  y = c · Σ_{e∈I} w_e E_e(x),  c = 1 (`softmax_topk`, the code) or c = E (`scaled`)
    (5) conversion:   W1_e = W1[eH:(e+1)H, :], b1_e = b1[eH:(e+1)H], W2_e = W2[:, eH:(e+1)H], b2_e = b2/E, so
                      Σ_e E_e(x) = dense(x): at k = E with uniform weights, `scaled` reproduces the dense MLP
                      exactly, and at k < E it is inverted dropout's E/k rescale of the selected chunks
    (6) load:         f_e = #{(t, j): I_tj = e} / (T·k)  (sums to 1 over experts; logged)
                      balance loss (learned router): L_bal = E · Σ_e f_e P_e,  P_e = Σ_t softmax(g(x_t))_e / (T·k)
                      (the code's `CustomNaiveGate_Balance`: P_e over T·k, not T, so its minimum is 1/k)
    (7) dense-dropout baseline: h ← h ⊙ m on the dense hidden units, m_i = 1[u_{i mod E} > p], u ~ U(0, 1)^E drawn
                      once per forward pass (expert-sized, strided chunks; no 1/(1-p) rescale: the code's
                      `PositionwiseFF_Dropout`); the model stays dense

The experts are stored stacked: `weight_in`/`weight_gate`/`weight_out` of shape (E, H, d) and `bias_*` of shape (E, H)
or (E, d), so that the concatenated experts are the dense weights (`weight_in.reshape(E·H, d)` is W1,
`weight_out.reshape(E·H, d)` is W2ᵀ). The sparse forward pass runs only the selected experts: assignments sorted by
expert, one matmul per expert on its own tokens, weighted and scattered back with `index_add_` (LLaMA-MoE's
`UniversalCalculator`); at k = E every expert sees every token and one dense matmul computes (4) exactly.
`forward_reference` is the masked dense computation (every expert on every token, weights zero off I), for tests.

Blocks replaced: GPT-NeoX `mlp` (dense_h_to_4h, act, dense_4h_to_h), Llama-style `mlp` (gate_proj, up_proj,
down_proj), BERT-style layers (`intermediate` becomes the MoE layer, with b2 inside the experts, and
`output.dense` becomes an identity, so BertOutput's dropout, residual and LayerNorm still follow it).

Checkpoints: the conversion is recorded in `config.smoe` (config.json) and the model's class becomes a subclass of
its own (`SMoE<Class>`) whose constructor re-applies it, so `save_pretrained`/`from_pretrained` of that class, the
workbench loader (`moe_model_class`) and the Trainer's resume all rebuild the converted architecture before the
weights are read; every weight then comes from the checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.distributed import gathered_parameters

__all__ = ["COMBINES", "INITS", "ROUTERS", "ROUTER_INITS", "WEIGHTS", "ChunkDropout", "MLPBlock", "MoEMLP",
           "add_chunk_dropout", "broadcast_frozen_routers", "convert_to_moe", "expert_load", "find_mlp_blocks", "is_moe_checkpoint",
           "moe_config", "moe_layers", "moe_model_class", "restore_moe_layers", "set_active_experts"]

COMBINES = ("softmax_topk", "scaled")
WEIGHTS = ("softmax", "uniform")
ROUTERS = ("random_frozen", "learned")
ROUTER_INITS = ("normal", "default")
INITS = ("scratch", "split")


def _check_choice(field: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{field} must be one of {', '.join(valid)}, got {value!r}")


def _gate_dtype(logits: torch.Tensor) -> torch.dtype:
    """Router softmax precision: float32 at least (bf16/fp16 logits), float64 for float64 models."""
    return torch.promote_types(logits.dtype, torch.float32)


class MoEMLP(nn.Module):
    """E experts of width d_ff/E with a top-k router, eqs. (1)-(6); maps (..., d) to (..., d).

    `k` is the number of experts a token uses in training mode and `eval_k` in eval mode (None: E, the code's
    score-based dense inference); set both at once with `set_active_experts`. `last_load` is eq. (6)'s f of the
    latest forward pass; training passes also add it to a running sum read by `expert_load`. With a learned
    router, `aux_loss` holds the latest training pass's balance loss (eq. 6), for the method to add to the loss
    (`track_balance = False` skips it)."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, act: Callable[[torch.Tensor], torch.Tensor], *,
                 gated: bool = False, bias_in: bool = True, bias_out: bool = True, combine: str = "softmax_topk",
                 weights: str = "softmax", router: str = "random_frozen", k: int | None = None,
                 eval_k: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_experts < 1 or d_ff % num_experts:
            raise ValueError(f"num_experts must be >= 1 and divide the MLP width {d_ff}, got {num_experts}")
        _check_choice("combine", combine, COMBINES)
        _check_choice("weights", weights, WEIGHTS)
        _check_choice("router", router, ROUTERS)
        self.d_model, self.num_experts, self.expert_width = d_model, num_experts, d_ff // num_experts
        self.gated, self.combine, self.weights = gated, combine, weights
        shape = (num_experts, self.expert_width, d_model)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        def param(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*size, **factory))

        self.weight_in = param(*shape)
        self.bias_in = param(num_experts, self.expert_width) if bias_in else None
        self.weight_gate = param(*shape) if gated else None
        self.bias_gate = param(num_experts, self.expert_width) if gated and bias_in else None
        self.weight_out = param(*shape)
        self.bias_out = param(num_experts, d_model) if bias_out else None
        self.router_weight: torch.Tensor
        self.router_bias: torch.Tensor
        self.router_mode = ""
        self.set_router_mode(router, torch.empty(num_experts, d_model, **factory), torch.empty(num_experts, **factory))
        self.act = act
        self._k = num_experts
        self._eval_k: int | None = None
        self.k = num_experts if k is None else k
        self.eval_k = eval_k
        self.last_load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.track_balance = router == "learned"  # compute aux_loss in training passes (learned router only)
        self._load_sum: torch.Tensor | None = None
        self._load_passes = 0

    # --- k ------------------------------------------------------------------------------------------------
    def _valid_k(self, field: str, k: int) -> int:
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= self.num_experts:
            raise ValueError(f"{field} must be an integer in [1, {self.num_experts}] (the number of experts), got {k}")
        return int(k)

    @property
    def k(self) -> int:
        """Experts per token in training mode."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = self._valid_k("k", value)

    @property
    def eval_k(self) -> int | None:
        """Experts per token in eval mode (None: all E)."""
        return self._eval_k

    @eval_k.setter
    def eval_k(self, value: int | None) -> None:
        self._eval_k = None if value is None else self._valid_k("eval_k", value)

    def set_router_mode(self, mode: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """`random_frozen`: the router's weight and bias are persistent buffers (saved in checkpoints, never seen by
        an optimizer or autograd, so bitwise fixed); `learned`: parameters. Same names, so either loads the other."""
        _check_choice("router", mode, ROUTERS)
        if mode == self.router_mode and weight is None and bias is None:
            return  # nothing to change (and a ZeRO-3 partitioned router must stay the parameter DeepSpeed knows)
        if weight is None and bias is None and self.router_mode == "learned":
            with gathered_parameters([self.router_weight, self.router_bias]):  # ZeRO-3: the full values
                weight, bias = self.router_weight.detach().clone(), self.router_bias.detach().clone()
        weight = self.router_weight if weight is None else weight
        bias = self.router_bias if bias is None else bias
        for name in ("router_weight", "router_bias"):
            if hasattr(self, name):
                delattr(self, name)
        for name, value in (("router_weight", weight), ("router_bias", bias)):
            if mode == "learned":
                self.register_parameter(name, nn.Parameter(value.detach(), requires_grad=True))
            else:
                self.register_buffer(name, value.detach(), persistent=True)
        self.router_mode = mode

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (2): g(x) = W_r x + b_r for tokens x (T, d) -> (T, E)."""
        return F.linear(x, self.router_weight, self.router_bias)

    @property
    def active_k(self) -> int:
        """The k this module uses now: `k` in training mode, `eval_k` (default E) in eval mode."""
        return self._k if self.training else (self._eval_k or self.num_experts)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, experts={self.num_experts}x{self.expert_width}, gated={self.gated}, "
                f"k={self.k}, eval_k={self.eval_k}, combine={self.combine}, weights={self.weights}, "
                f"router={self.router_mode}")

    # --- initialisation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_scratch(self, std: float = 0.02) -> None:
        """Independent experts (the paper's setting): weights N(0, std), biases 0."""
        for weight in (self.weight_in, self.weight_gate, self.weight_out):
            if weight is not None:
                nn.init.normal_(weight, 0.0, std)
        for bias in (self.bias_in, self.bias_gate, self.bias_out):
            if bias is not None:
                nn.init.zeros_(bias)

    @torch.no_grad()
    def init_router(self, mode: str = "normal", std: float = 0.02) -> None:
        """Eq. (2): N(0, std) weights and zero bias (the code's `weights_init`), or PyTorch's default init."""
        _check_choice("router_init", mode, ROUTER_INITS)
        if mode == "default":  # nn.Linear.reset_parameters: kaiming_uniform(a=√5) = U(±1/√d), bias U(±1/√d)
            nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(self.d_model)
            nn.init.uniform_(self.router_bias, -bound, bound)
        else:
            nn.init.normal_(self.router_weight, 0.0, std)
            nn.init.zeros_(self.router_bias)

    @torch.no_grad()
    def load_dense(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                   b_out: torch.Tensor | None, w_gate: torch.Tensor | None = None,
                   b_gate: torch.Tensor | None = None) -> None:
        """Eq. (5): split a dense MLP (PyTorch layouts: w_in, w_gate (d_ff, d); w_out (d, d_ff)) into the experts."""
        e, h, d = self.num_experts, self.expert_width, self.d_model
        self.weight_in.copy_(w_in.reshape(e, h, d))
        self.weight_out.copy_(w_out.t().reshape(e, h, d))
        if self.weight_gate is not None:
            self.weight_gate.copy_(w_gate.reshape(e, h, d))
        for mine, dense in ((self.bias_in, b_in), (self.bias_gate, b_gate)):
            if mine is not None:
                mine.copy_(dense.reshape(e, h) if dense is not None else torch.zeros_like(mine))
        if self.bias_out is not None:
            self.bias_out.copy_((b_out / e).expand(e, d) if b_out is not None else torch.zeros_like(self.bias_out))

    # --- routing ------------------------------------------------------------------------------------------
    def route(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (3)-(4): the k selected experts of each token (T, k) and their weights times c (T, k; in float32
        at least)."""
        top, index = logits.topk(k, dim=-1)
        if self.weights == "uniform":
            gate = torch.full(top.shape, 1.0 / k, dtype=_gate_dtype(logits), device=top.device)
        else:
            gate = torch.softmax(top.to(_gate_dtype(logits)), dim=-1)
        if self.combine == "scaled":
            gate = gate * self.num_experts
        return index, gate

    def _record(self, logits: torch.Tensor, counts: torch.Tensor, k: int) -> None:
        """Eq. (6): this pass's load, its running sum (training) and the learned router's balance loss."""
        load = counts.detach().float() / (logits.shape[0] * k)
        self.last_load = load
        if self.training:
            self._load_sum = load if self._load_sum is None else self._load_sum + load
            self._load_passes += 1
            if self.router_mode == "learned" and self.track_balance and torch.is_grad_enabled():
                prob = torch.softmax(logits.to(_gate_dtype(logits)), dim=-1).sum(0) / (logits.shape[0] * k)
                self.aux_loss = self.num_experts * (load * prob).sum()

    def pop_load(self) -> torch.Tensor | None:
        """Mean eq.-(6) load over the training passes since the last call (None if there were none); resets."""
        if self._load_sum is None:
            return None
        mean = self._load_sum / self._load_passes
        self._load_sum, self._load_passes = None, 0
        return mean

    # --- forward ------------------------------------------------------------------------------------------
    def _hidden(self, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, w_gate: torch.Tensor | None,
                b_gate: torch.Tensor | None) -> torch.Tensor:
        up = F.linear(x, w_in, b_in)
        return self.act(F.linear(x, w_gate, b_gate)) * up if self.gated else self.act(up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        logits = self.router_logits(flat)
        k = self.active_k
        if k == self.num_experts:
            out = self._all_experts(flat, logits)
        else:
            index, gate = self.route(logits, k)
            out = self._sparse(flat, logits, index, gate)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _all_experts(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """k = E: every expert on every token, as one dense matmul over the concatenated experts (nothing to skip);
        the weights are the softmax over all E logits (the set topk(E) selects, in any order)."""
        e, h, tokens = self.num_experts, self.expert_width, x.shape[0]
        self._record(logits, torch.full((e,), tokens, device=x.device), e)
        if self.weights == "uniform":
            gate = torch.full((tokens, e), 1.0 / e, dtype=_gate_dtype(logits), device=x.device)
        else:
            gate = torch.softmax(logits.to(_gate_dtype(logits)), dim=-1)
        if self.combine == "scaled":
            gate = gate * e

        def cat(p: torch.Tensor | None) -> torch.Tensor | None:  # the experts side by side: the dense layout
            return None if p is None else p.reshape(e * h, *p.shape[2:])

        hidden = self._hidden(x, cat(self.weight_in), cat(self.bias_in), cat(self.weight_gate), cat(self.bias_gate))
        gate = gate.to(hidden.dtype)
        hidden = (hidden.view(tokens, e, h) * gate.unsqueeze(-1)).view(tokens, e * h)
        out = hidden @ self.weight_out.reshape(e * h, self.d_model).to(hidden.dtype)
        if self.bias_out is not None:
            out = out + gate @ self.bias_out.to(hidden.dtype)
        return out

    def _sparse(self, x: torch.Tensor, logits: torch.Tensor, index: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Only the selected experts run: the (token, expert) assignments sorted by expert, then per expert one
        gather of its tokens, its matmuls, the gate weight on its hidden units and one `index_add_` into the output.
        b2 enters once per token as (scattered gates) @ b2, so no per-expert (n x d) rescale is needed."""
        tokens, k = index.shape
        if tokens == 0:
            return x.new_zeros(0, self.d_model)
        experts = index.reshape(-1)
        counts = torch.bincount(experts, minlength=self.num_experts)
        self._record(logits, counts, k)
        order = experts.argsort(stable=True)
        sizes = counts.tolist()
        token_of = torch.div(order, k, rounding_mode="floor").split(sizes)
        gate_of = gate.reshape(-1).index_select(0, order).split(sizes)
        w_in, w_out = self.weight_in.unbind(0), self.weight_out.unbind(0)
        none = [None] * self.num_experts
        b_in = none if self.bias_in is None else self.bias_in.unbind(0)
        w_gate = none if self.weight_gate is None else self.weight_gate.unbind(0)
        b_gate = none if self.bias_gate is None else self.bias_gate.unbind(0)
        out: torch.Tensor | None = None
        for e, size in enumerate(sizes):
            if size == 0:
                continue
            hidden = self._hidden(x.index_select(0, token_of[e]), w_in[e], b_in[e], w_gate[e], b_gate[e])
            hidden = hidden * gate_of[e].to(hidden.dtype).unsqueeze(-1)
            part = hidden @ w_out[e].to(hidden.dtype)
            if out is None:
                out = part.new_zeros(tokens, self.d_model)
            out = out.index_add_(0, token_of[e], part)
        if self.bias_out is not None:
            scattered = torch.zeros(tokens, self.num_experts, dtype=out.dtype, device=out.device)
            out = out + scattered.scatter_(1, index, gate.to(out.dtype)) @ self.bias_out.to(out.dtype)
        return out

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (4) by masked dense compute: every expert on every token, weight 0 outside the top k. Exact but saves
        nothing; a correctness reference for the sparse path (records no load)."""
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        index, gate = self.route(self.router_logits(flat), self.active_k)
        dense_gate = torch.zeros(flat.shape[0], self.num_experts, dtype=gate.dtype, device=gate.device)
        dense_gate = dense_gate.scatter(1, index, gate)
        up = torch.einsum("td,ehd->teh", flat, self.weight_in)
        if self.bias_in is not None:
            up = up + self.bias_in
        if self.gated:
            pre = torch.einsum("td,ehd->teh", flat, self.weight_gate)
            hidden = self.act(pre + self.bias_gate if self.bias_gate is not None else pre) * up
        else:
            hidden = self.act(up)
        out = torch.einsum("teh,ehd->ted", hidden, self.weight_out)
        if self.bias_out is not None:
            out = out + self.bias_out
        y = torch.einsum("te,ted->td", dense_gate.to(out.dtype), out)
        return y.reshape(*shape[:-1], y.shape[-1])


# --- finding and replacing dense MLPs ---------------------------------------------------------------------
@dataclass
class MLPBlock:
    """One dense MLP of a model (or the MoE layer that replaced it), in model order."""

    index: int
    name: str  # dotted name of the module that is (or was) replaced
    kind: str  # "mlp" (GPT-NeoX), "gated" (Llama SwiGLU), "bert" (intermediate + output.dense), "moe" (converted)
    module: nn.Module
    output: nn.Module | None = None  # BertOutput, for "bert"


def find_mlp_blocks(model: nn.Module) -> list[MLPBlock]:
    """Every dense MLP (or already converted MoE layer) of `model`, in the order of its layers."""
    blocks: list[MLPBlock] = []
    for name, module in model.named_modules():
        kind, output, target = None, None, name
        if isinstance(module, MoEMLP):
            kind = "moe"
        elif all(isinstance(getattr(module, a, None), nn.Linear) for a in ("dense_h_to_4h", "dense_4h_to_h")):
            kind = "mlp"
        elif all(isinstance(getattr(module, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            kind = "gated"
        elif (isinstance(getattr(getattr(module, "intermediate", None), "dense", None), nn.Linear)
              and isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)):
            kind, output, target = "bert", module.output, f"{name}.intermediate"
            module = module.intermediate
        if kind is not None:
            blocks.append(MLPBlock(len(blocks), target, kind, module, output))
    return blocks


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also under ZeRO-3 (where `param.shape` is a placeholder's)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _dense_parts(block: MLPBlock) -> dict[str, Any]:
    """The linear layers and activation of a dense block: w_in (d_ff x d), optional gate, w_out (d x d_ff)."""
    m = block.module
    if block.kind == "mlp":
        return {"up": m.dense_h_to_4h, "gate": None, "down": m.dense_4h_to_h, "act": m.act}
    if block.kind == "gated":
        return {"up": m.up_proj, "gate": m.gate_proj, "down": m.down_proj, "act": m.act_fn}
    return {"up": m.dense, "gate": None, "down": block.output.dense, "act": m.intermediate_act_fn}


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
    defaults to the config's initializer_range, else 0.02) or `split` (eq. 5; under ZeRO-3 the dense weights are
    gathered first). Raises ValueError naming the argument at fault."""
    _check_choice("init", init, INITS)
    _check_choice("router_init", router_init, ROUTER_INITS)
    blocks = find_mlp_blocks(model)
    if not blocks:
        raise ValueError(f"no dense MLP blocks (GPT-NeoX, Llama or BERT style) found in {type(model).__name__}")
    if any(b.kind == "moe" for b in blocks):
        raise ValueError(f"{type(model).__name__} already has MoE layers (config.smoe = {_smoe(model)})")
    chosen = _select(blocks, layers)
    config = getattr(model, "config", None)
    std = init_std if init_std is not None else float(getattr(config, "initializer_range", 0.02) or 0.02)
    converted = []
    for block in chosen:
        parts = _dense_parts(block)
        up, gate, down = parts["up"], parts["gate"], parts["down"]
        d_ff, d_model = _shape(up.weight)
        if d_ff % num_experts or num_experts < 1:
            raise ValueError(f"num_experts ({num_experts}) must divide the MLP width d_ff ({d_ff}) of block "
                             f"{block.index} ('{block.name}')")
        moe = MoEMLP(d_model, d_ff, num_experts, parts["act"], gated=gate is not None, bias_in=up.bias is not None,
                     bias_out=down.bias is not None, combine=combine, weights=weights, router=router, k=k,
                     eval_k=eval_k, device=up.weight.device, dtype=up.weight.dtype).train(block.module.training)
        if init == "split":
            dense = [p for lin in (up, gate, down) if lin is not None for p in lin.parameters()]
            with gathered_parameters(dense):
                moe.load_dense(up.weight, up.bias, down.weight, down.bias,
                               None if gate is None else gate.weight, None if gate is None else gate.bias)
        else:
            moe.init_scratch(std)
        moe.init_router(router_init, router_std)
        _replace(model, block, moe)
        converted.append(moe)
    if config is not None:
        config.smoe = {"num_experts": num_experts, "layers": [b.index for b in chosen], "combine": combine,
                       "weights": weights, "router": router, "eval_k": eval_k}
    if hasattr(type(model), "from_pretrained") and config is not None:  # a transformers model: reloads converted
        model.__class__ = moe_model_class(type(model))
    return converted


def _replace(model: nn.Module, block: MLPBlock, moe: MoEMLP) -> None:
    parent_name, _, attr = block.name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, moe)
    if block.kind == "bert":  # b2 lives in the experts; BertOutput keeps its dropout, residual and LayerNorm
        block.output.dense = nn.Identity()


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
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for layer in layers:
        for buffer in (layer.router_weight, layer.router_bias):
            value = buffer if device is None else buffer.to(device)
            dist.broadcast(value, src=0)
            if value is not buffer:
                buffer.copy_(value)
    return len(layers)


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
        loads.append(load.float().cpu())
    return torch.stack(loads) if loads else None


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
        chunk = ChunkDropout(_shape(down.weight)[1], num_experts, p, rescale)
        down.add_module("workbench_chunk_dropout", chunk)  # a child, so train()/eval() reach it
        down.register_forward_pre_hook(lambda module, args, chunk=chunk: (chunk(args[0]), *args[1:]))
        added.append(chunk)
    return added


def mean_active_fraction(ks: list[int], num_experts: int) -> float:
    """Mean k/E over steps: the fraction of the dense MLP's FLOPs the experts spend (router and scatter aside)."""
    return math.fsum(ks) / (len(ks) * num_experts) if ks else 1.0
