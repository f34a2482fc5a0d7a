"""Mixture-of-experts MLPs cut from a dense MLP (SMoE-Dropout, Chen et al., ICLR 2023): the model side.

A dense MLP of width d_ff becomes E experts of width H = d_ff/E with, together, the dense MLP's parameters. The
project's SMoE-Dropout spec (`docs/specs/smoe_dropout.md`, its Corrections win) and the official code
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
expert, the experts' matmuls on their own tokens, weighted and scattered back with one `index_add_` (LLaMA-MoE's
`UniversalCalculator`); at k = E every expert sees every token and one dense matmul computes (4) exactly.
The experts' matmuls are one `torch.nn.functional.grouped_mm` per weight where PyTorch runs it (bf16 on CUDA;
bf16, fp16, fp32 on CPU; 16-byte aligned rows): the expert sizes stay on the device, so the layer never waits
for the host. Elsewhere (fp16/fp32 on CUDA, float64, odd widths) a loop over the experts reads their token
counts on the host once per layer. `forward_reference` is the masked dense computation (every expert on every
token, weights zero off I), for tests.

Putting these layers into a whole model (conversion, checkpoints, k, load): `workbench/models/moe_model.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.distributed import gathered_parameters

__all__ = ["COMBINES", "INITS", "ROUTERS", "ROUTER_INITS", "WEIGHTS", "MoEMLP", "expert_counts",
           "grouped_mm_supported"]

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


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many assignments each expert got, (E,) int64 on the assignments' device. Unlike `torch.bincount`,
    whose CUDA kernel reads the largest index on the host first, this never waits for the device."""
    ones = torch.ones_like(experts)
    return torch.zeros(num_experts, dtype=experts.dtype, device=experts.device).index_add_(0, experts, ones)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs on `device` in `dtype`: bf16 on CUDA GPUs of compute
    capability 8.0 or newer (PyTorch's CUDA kernel takes bf16 only), bf16, fp16 and fp32 on CPU."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return dtype == torch.bfloat16 and _cuda_capability(index) >= (8, 0)
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16, torch.float32)


def _aligned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` starts on a 16-byte boundary and every stride but the unit one spans whole 16 bytes."""
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all(stride == 1 or stride * size % 16 == 0 for stride in tensor.stride())


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
        """Only the selected experts run: the (token, expert) assignments sorted by expert, each expert's matmuls on
        its own tokens with the gate weight on its hidden units, one `index_add_` into the output. b2 enters once
        per token as (scattered gates) @ b2, so no per-expert (n x d) rescale is needed."""
        tokens, k = index.shape
        if tokens == 0:
            return x.new_zeros(0, self.d_model)
        experts = index.reshape(-1)
        counts = expert_counts(experts, self.num_experts)
        self._record(logits, counts, k)
        order = experts.argsort(stable=True)
        token_of = torch.div(order, k, rounding_mode="floor")
        gate_sorted = gate.reshape(-1).index_select(0, order)
        if self._grouped_fits(x):
            rows = self._grouped_experts(x.index_select(0, token_of), experts.index_select(0, order), gate_sorted,
                                         counts)
            out = rows.new_zeros(tokens, self.d_model).index_add_(0, token_of, rows)
        else:
            out = self._looped_experts(x, token_of, gate_sorted, counts)
        if self.bias_out is not None:
            scattered = torch.zeros(tokens, self.num_experts, dtype=out.dtype, device=out.device)
            out = out + scattered.scatter_(1, index, gate.to(out.dtype)) @ self.bias_out.to(out.dtype)
        return out

    def _expert_weights(self) -> list[torch.Tensor]:
        """The stacked expert tensors the sparse path multiplies by (those the layer has)."""
        return [w for w in (self.weight_in, self.weight_gate, self.weight_out) if w is not None]

    def _grouped_fits(self, x: torch.Tensor) -> bool:
        """Whether `grouped_mm` runs the experts on tokens `x` here: a device and dtype it supports, and operands
        whose rows start on 16-byte boundaries (its kernels' layout rule; the gathered tokens and hidden units
        are new tensors, aligned by the allocator, with rows of d and H elements)."""
        if not grouped_mm_supported(x.device, x.dtype):
            return False
        size = x.element_size()
        rows_fit = self.d_model * size % 16 == 0 and self.expert_width * size % 16 == 0
        return rows_fit and all(w.dtype == x.dtype and _aligned(w) for w in self._expert_weights())

    def _grouped_experts(self, rows: torch.Tensor, expert_of_row: torch.Tensor, gate_sorted: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
        """Each expert on its own rows (sorted by expert) as one grouped matmul per weight, the group ends the
        running sum of `counts` (kept on the device): the output rows, gate-weighted, in the order of `rows`."""
        offsets = counts.cumsum(0).to(torch.int32)

        def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = F.grouped_mm(a, weight.transpose(1, 2), offs=offsets)  # a_i @ W_e(i)ᵀ
            return out if bias is None else out + bias.index_select(0, expert_of_row)

        up = linear(rows, self.weight_in, self.bias_in)
        hidden = self.act(linear(rows, self.weight_gate, self.bias_gate)) * up if self.gated else self.act(up)
        hidden = hidden * gate_sorted.to(hidden.dtype).unsqueeze(-1)
        return F.grouped_mm(hidden, self.weight_out, offs=offsets)  # h_i @ W2_e(i)ᵀ

    def _looped_experts(self, x: torch.Tensor, token_of: torch.Tensor, gate_sorted: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        """As the grouped path, one expert at a time: per expert one gather of its tokens, its matmuls, its gate
        weights and one `index_add_` into the output (the sizes read on the host: one sync per layer)."""
        sizes = counts.tolist()
        token_of_expert, gate_of_expert = token_of.split(sizes), gate_sorted.split(sizes)
        none = [None] * self.num_experts
        w_in, w_out = self.weight_in.unbind(0), self.weight_out.unbind(0)
        b_in = none if self.bias_in is None else self.bias_in.unbind(0)
        w_gate = none if self.weight_gate is None else self.weight_gate.unbind(0)
        b_gate = none if self.bias_gate is None else self.bias_gate.unbind(0)
        out: torch.Tensor | None = None
        for e, size in enumerate(sizes):
            if size == 0:
                continue
            hidden = self._hidden(x.index_select(0, token_of_expert[e]), w_in[e], b_in[e], w_gate[e], b_gate[e])
            hidden = hidden * gate_of_expert[e].to(hidden.dtype).unsqueeze(-1)
            part = hidden @ w_out[e].to(hidden.dtype)
            if out is None:
                out = part.new_zeros(x.shape[0], self.d_model)
            out = out.index_add_(0, token_of_expert[e], part)
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
