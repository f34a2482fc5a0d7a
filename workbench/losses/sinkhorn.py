"""Entropic optimal transport between two sets of probability vectors: the batch-wise Sinkhorn distance of SinKD.

Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation" (LREC-COLING 2024; official code
2018cx/SinKD, `loss.py` class `Sinkhorn`); the sections cited are the project's spec `docs/specs/sinkd.md`, whose
Corrections win where they differ. The N student and M teacher distributions of a batch are two point clouds
with uniform weights (a_i = 1/N, b_j = 1/M), and the ground cost between two *samples* is the L1 distance of
their class (or vocabulary) distributions:

    (1) s_i = softmax(z^s_i / τ_S),  t_j = softmax(z^t_j / τ_S)                 τ_S = 2 in the official code (§1.1)
    (2) W_ij = ‖s_i − t_j‖₁ = Σ_c |s_i(c) − t_j(c)|                          an N×M matrix, torch.cdist(p=1)
    (3) K = exp(−W/ε);  for n iterations:  u ← a ⊘ (K v),  v ← b ⊘ (Kᵀ u)       the kernel iteration, v₀ = 1
    (4) in the log domain, with α = log u, β = log v:
            α_i ← log a_i − LSE_j(β_j − W_ij/ε),   β_j ← log b_j − LSE_i(α_i − W_ij/ε)
    (5) P_ij = u_i K_ij v_j = exp(α_i + β_j − W_ij/ε),   D = ⟨P, W⟩ = Σ_ij P_ij W_ij
    (6) scaling `sum`: N·D (the official value, §1.4.1),   `mean`: D (what `ot.sinkhorn2(a, b, W, ε)` returns)

The row step comes first, so (3) is the official `P ← P/rowsum(P); P ← P/colsum(P)` started from P = K, up to the
factor N of the marginals: the official plan is doubly stochastic (rows and columns sum to 1), POT's sums to 1 in
all, so the official ⟨P, W⟩ is N·D for N = M. D is the transport cost of the entropic plan only, without the
entropy term (POT's `sinkhorn2` returns the same). (4) is the logarithm of (3), equal in exact arithmetic; it stays
finite where K underflows (ε ≲ 0.05 in float32: W/ε > 87 flushes K to 0, §Corrections "Precision"), and is the
default for half-precision inputs. Every computation runs in float32 or wider, whatever the input dtype.

The n iterations are unrolled and differentiated through (no stopping threshold, so the backward pass costs the
same every step); after the last (column) step the columns of P sum exactly to b, the rows only approximately
(§Corrections: at ε = 0.1 and n = 20, D is within ~1e-2 relative of its converged value).

Memory: the N×M cost comes from `torch.cdist(p=1)` and no N×M×V tensor is built. torch's own CUDA backward of
cdist allocates a batch×M×N×V buffer, so off the CPU `l1_cdist` computes that gradient in row chunks of bounded
size instead (the CPU backward of torch.cdist allocates no such buffer and is used as is).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

SCALINGS = ("sum", "mean")
LOG_DOMAIN_BELOW_EPSILON = 0.05  # auto: the kernel iteration at ε >= this in float32/64, the log domain otherwise
HALF_DTYPES = (torch.float16, torch.bfloat16)
CDIST_BACKWARD_ELEMENTS = 2**26  # off the CPU, torch.cdist's own backward only below this batch×N×M×V size
_MASKED = -1e30  # log-kernel entry of a pair with a padded point: exp() of it is exactly 0, and it stays finite


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the transport is computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def use_log_domain(epsilon: float, dtype: torch.dtype, log_domain: bool | None = None) -> bool:
    """`log_domain` if given; else (auto) the log domain for ε < 0.05 or half-precision inputs, eq. (4)."""
    if log_domain is not None:
        return bool(log_domain)
    return epsilon < LOG_DOMAIN_BELOW_EPSILON or dtype in HALF_DTYPES


def check_options(epsilon: float, iterations: int, scaling: str) -> None:
    """Raise ValueError naming the first invalid Sinkhorn option."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")


# ----------------------------------------------------------------------------------------------------------
# Eq. (2): the L1 cost between samples
# ----------------------------------------------------------------------------------------------------------


class _ChunkedL1Distance(torch.autograd.Function):
    """W = cdist(x, y, p=1) with a backward that never holds more than `chunk` × M × V sign entries:
    ∂L/∂x_i = Σ_j G_ij sign(x_i − y_j),  ∂L/∂y_j = −Σ_i G_ij sign(x_i − y_j)  (sign(0) = 0, as torch's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, max_elements: int) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        ctx.max_elements = max_elements
        return torch.cdist(x, y, p=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        batch = x.shape[:-2].numel()
        rows = max(1, ctx.max_elements // max(1, batch * y.shape[-2] * x.shape[-1]))
        for start in range(0, x.shape[-2], rows):
            part = slice(start, start + rows)
            signs = torch.sign(x[..., part, None, :] - y[..., None, :, :])  # (..., rows, M, V)
            weights = grad[..., part, :, None]
            if need_x:
                grad_x[..., part, :] = (weights * signs).sum(-2)
            if need_y:
                grad_y -= (weights * signs).sum(-3)
        return grad_x, grad_y, None


def l1_cdist(x: torch.Tensor, y: torch.Tensor, max_elements: int = CDIST_BACKWARD_ELEMENTS,
             chunked: bool | None = None) -> torch.Tensor:
    """Eq. (2): W[..., i, j] = ‖x[..., i, :] − y[..., j, :]‖₁ for x (..., N, V) and y (..., M, V).

    `chunked` (None: auto) picks the backward: torch.cdist's own (CPU, or a batch×N×M×V below `max_elements`),
    or `_ChunkedL1Distance`, whose backward holds at most `max_elements` sign entries at a time."""
    if chunked is None:
        elements = x.shape[:-2].numel() * x.shape[-2] * y.shape[-2] * x.shape[-1]
        chunked = x.device.type != "cpu" and elements > max_elements
    if chunked and torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _ChunkedL1Distance.apply(x, y, max_elements)
    return torch.cdist(x, y, p=1)


# ----------------------------------------------------------------------------------------------------------
# Eqs. (3)-(6): the Sinkhorn iteration and the transport cost
# ----------------------------------------------------------------------------------------------------------


def _masks(cost: torch.Tensor, row_mask: torch.Tensor | None,
           col_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.ones(cost.shape[:-1], dtype=torch.bool, device=cost.device) if row_mask is None else row_mask.bool()
    cols = (torch.ones(cost.shape[:-2] + cost.shape[-1:], dtype=torch.bool, device=cost.device)
            if col_mask is None else col_mask.bool())
    return rows.expand(cost.shape[:-1]), cols.expand(cost.shape[:-2] + cost.shape[-1:])


def transport_plan(cost: torch.Tensor, epsilon: float = 0.1, iterations: int = 20, *, log_domain: bool | None = None,
                   row_mask: torch.Tensor | None = None, col_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. (3)-(5): the entropic plan P (..., N, M) for `cost` (..., N, M) after `iterations` row+column steps,
    with POT's uniform marginals over the points the masks keep (1/n rows, 1/m columns; P is 0 on padded points).

    `row_mask` (..., N) and `col_mask` (..., M), True for real points, let one call solve a batch of problems of
    different sizes (padded). `log_domain`: eq. (4) instead of (3); None picks it by `use_log_domain`."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    log = use_log_domain(epsilon, cost.dtype, log_domain)
    cost = cost.to(compute_dtype(cost.dtype))
    if row_mask is None and col_mask is None:
        return _plan_unmasked(cost, epsilon, iterations, log)
    rows, cols = _masks(cost, row_mask, col_mask)
    n = rows.sum(-1, keepdim=True).clamp_min(1).to(cost.dtype)  # a problem without points: P = 0
    m = cols.sum(-1, keepdim=True).clamp_min(1).to(cost.dtype)
    pairs = rows[..., :, None] & cols[..., None, :]
    if log:
        log_kernel = torch.where(pairs, -cost / epsilon, torch.full_like(cost, _MASKED))
        log_a, log_b = -torch.log(n), -torch.log(m)  # (..., 1): broadcast over the points
        beta = torch.zeros_like(cost[..., 0, :])
        for _ in range(iterations):
            alpha = torch.where(rows, log_a - torch.logsumexp(log_kernel + beta[..., None, :], dim=-1), 0.0)
            beta = torch.where(cols, log_b - torch.logsumexp(log_kernel + alpha[..., :, None], dim=-2), 0.0)
        return torch.exp(log_kernel + alpha[..., :, None] + beta[..., None, :])
    kernel = torch.exp(-cost / epsilon) * pairs
    a, b = rows / n, cols / m
    v = cols.to(cost.dtype)
    for _ in range(iterations):
        u = a / torch.where(rows, (kernel @ v[..., None])[..., 0], 1.0)
        v = b / torch.where(cols, (u[..., None, :] @ kernel)[..., 0, :], 1.0)
    return u[..., :, None] * kernel * v[..., None, :]


def _plan_unmasked(cost: torch.Tensor, epsilon: float, iterations: int, log: bool) -> torch.Tensor:
    """`transport_plan` without padded points: the same iteration in as few autograd nodes as possible (a step
    of a 32 x 32 problem is dominated by per-operation overhead, not arithmetic)."""
    log_a, log_b = -math.log(cost.shape[-2]), -math.log(cost.shape[-1])
    if log:
        log_kernel = cost / -epsilon
        beta = torch.zeros_like(cost[..., 0, :])
        for _ in range(iterations):
            alpha = log_a - torch.logsumexp(log_kernel + beta[..., None, :], dim=-1)
            beta = log_b - torch.logsumexp(log_kernel + alpha[..., :, None], dim=-2)
        return torch.exp(log_kernel + alpha[..., :, None] + beta[..., None, :])
    # u = a ⊘ (K v), v = b ⊘ (Kᵀ u) carried as ũ = u/a = 1 ⊘ (K v) and v = (b/a) ⊘ (Kᵀ ũ): the same plan
    kernel = torch.exp(cost / -epsilon)
    a, ratio = math.exp(log_a), math.exp(log_b - log_a)
    if kernel.dim() == 2:  # matrix-vector products
        kernel_t = kernel.T
        v = torch.ones_like(kernel[0])
        for _ in range(iterations):
            u = torch.mv(kernel, v).reciprocal()
            v = torch.mv(kernel_t, u).reciprocal()
            v = v * ratio if ratio != 1.0 else v
        return (a * u)[:, None] * kernel * v[None, :]
    v = torch.ones_like(kernel[..., 0, :, None])
    kernel_t = kernel.transpose(-2, -1)
    for _ in range(iterations):
        u = (kernel @ v).reciprocal()
        v = (kernel_t @ u).reciprocal()
        v = v * ratio if ratio != 1.0 else v
    return (a * u) * kernel * v.transpose(-2, -1)


def sinkhorn_cost(cost: torch.Tensor, epsilon: float = 0.1, iterations: int = 20, *,
                  scaling: Literal["sum", "mean"] = "sum", log_domain: bool | None = None,
                  row_mask: torch.Tensor | None = None, col_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. (5)-(6) for a given cost (..., N, M): ⟨P, W⟩ per problem, shape (...). `scaling='mean'` is D, what
    `ot.sinkhorn2(ones(N)/N, ones(M)/M, cost, epsilon)` returns once converged; `sum` is n·D with n the number of
    (unmasked) rows, the official SinKD value (its doubly stochastic plan). Float32 or wider; differentiable
    through the iterations with respect to `cost`."""
    check_options(epsilon, iterations, scaling)
    plan = transport_plan(cost, epsilon, iterations, log_domain=log_domain, row_mask=row_mask, col_mask=col_mask)
    cost = cost.to(plan.dtype)
    if row_mask is not None or col_mask is not None:
        rows, cols = _masks(cost, row_mask, col_mask)
        cost = torch.where(rows[..., :, None] & cols[..., None, :], cost, 0.0)
    value = (plan * cost).sum((-2, -1))
    if scaling == "mean":
        return value
    if row_mask is None:
        return value * cost.shape[-2]
    return value * row_mask.bool().expand(cost.shape[:-1]).sum(-1).to(value.dtype)


def check_same_vocabulary(student: torch.Tensor, teacher: torch.Tensor, what: str = "logits") -> None:
    """ValueError naming both sizes when the student's and teacher's last dimensions differ."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student and teacher {what} differ in vocabulary (last dimension): the student has "
                         f"{student.shape[-1]} entries, the teacher {teacher.shape[-1]}; distillation compares the "
                         "distributions entry by entry and needs one shared vocabulary (same tokenizer and size)")


def sinkhorn_distance_probs(student_probs: torch.Tensor, teacher_probs: torch.Tensor, *, epsilon: float = 0.1,
                            iterations: int = 20, scaling: Literal["sum", "mean"] = "sum",
                            log_domain: bool | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. (2)-(6) on probability vectors (..., N, V) (student) and (..., M, V) (teacher, detached): the L1 cost
    between samples, then `sinkhorn_cost`. `mask` (..., N) marks the real points when N = M (the same for both)."""
    check_same_vocabulary(student_probs, teacher_probs, "distributions")
    log = use_log_domain(epsilon, student_probs.dtype, log_domain)
    dtype = compute_dtype(student_probs.dtype)
    cost = l1_cdist(student_probs.to(dtype), teacher_probs.detach().to(dtype))
    return sinkhorn_cost(cost, epsilon, iterations, scaling=scaling, log_domain=log, row_mask=mask, col_mask=mask)


def sinkhorn_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 2.0,
                      epsilon: float = 0.1, iterations: int = 20, scaling: Literal["sum", "mean"] = "sum",
                      log_domain: bool | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch-wise SinKD distance, eqs. (1)-(6): the N student and N teacher distributions of a batch
    (logits (..., N, C), softmax at `temperature` τ_S over the last dimension) as two uniform point clouds with
    the L1 cost between samples; ε = `epsilon`, `iterations` unrolled steps. Returns ⟨P, W⟩ of shape (...):
    N·D for `scaling='sum'` (the paper's; it grows with N), D for `mean`. The teacher is detached. `mask`
    (..., N), True for the samples to keep, drops padded rows from both clouds.

    Not a per-sample loss: it is invariant to permutations of the batch and has a non-zero floor at s = t
    (the entropic plan is diffuse), so SinKD pairs it with CE and KL (§1.4.2)."""
    check_same_vocabulary(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log = use_log_domain(epsilon, student_logits.dtype, log_domain)
    dtype = compute_dtype(student_logits.dtype)
    student = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = torch.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    return sinkhorn_distance_probs(student, teacher, epsilon=epsilon, iterations=iterations, scaling=scaling,
                                   log_domain=log, mask=mask)
