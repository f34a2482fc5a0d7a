"""Per-sample distillation divergences between a student's and a teacher's softened distributions.

With s = softmax(z^s/τ) and t = softmax(z^t/τ) over the last dimension (classes or vocabulary), per position:

    (1) kl       KL(t‖s) = Σ_c t(c) [log t(c) − log s(c)]                      forward KL, mode-averaging
    (2) rkl      KL(s‖t) = Σ_c s(c) [log s(c) − log t(c)]                      reverse KL, mode-seeking
    (3) js       JS(t, s) = ½ KL(t‖m) + ½ KL(s‖m),  m = (t + s)/2,  0 ≤ JS ≤ log 2
    (4) tv       TV(t, s) = ½ Σ_c |t(c) − s(c)|                                total variation, in [0, 1]
    (5) l1       ‖t − s‖₁ = 2·TV: SinKD's sample-wise variant (a 1×1 plan per sample, §Corrections)
    (6) soft_ce  −Σ_c t(c) log s(c) = KL(t‖s) + H(t): the official SinKD `DistillKL` (same gradient as kl)

(§1.3 of the project's SinKD spec: its reference code's `JSKL` passes probabilities where `F.kl_div` expects
log-probabilities, which is not JS; (3) here is computed from log-probabilities, with log m = logaddexp(log s,
log t) − log 2.) All in float32 or wider, from log-softmax. The teacher is detached.

τ² convention: `tau_squared=True` multiplies the divergence by τ² (Hinton et al. 2015), which keeps the gradient's
size roughly independent of τ; the default (False) is the official SinKD code's, whose KD term has no τ² factor.

Reduction over positions (inputs (..., V), an optional `mask` (...) of the positions that count):

    (7) num_items_in_batch given:  Σ_{counted} d / num_items_in_batch     (causal LMs: the CE's own normaliser)
        reduction 'mean':          Σ_{counted} d / #counted               (0 when nothing counts)
        reduction 'sum':           Σ_{counted} d;   'none': d, 0 where not counted

Memory: `kd_loss` runs eqs. (1)-(6) over the counted rows `chunk_rows` at a time (`rowwise`; by default
CHUNK_ELEMENTS // V rows, 64 at V = 128k): the forward keeps no (rows × V) float32 tensor, and the backward
recomputes each chunk. Beyond the logits and their gradient (both in the logits' dtype) it holds a few
chunk-sized float32 temporaries (32 MiB each), whatever the number of tokens and the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from workbench.losses.sinkhorn import check_same_vocabulary, compute_dtype

KINDS = ("kl", "rkl", "js", "tv", "l1", "soft_ce")
REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMENTS = 2**23  # the token losses turn this many logits (32 MiB in float32) into float32 at once
MIN_CHUNKS = 16  # chunk_rows_for(..., rows): at least this many chunks, each's temporaries 1/16 of (rows, vocab)


def chunk_rows_for(vocab: int, chunk_rows: int | None = None, rows: int | None = None) -> int:
    """Rows of (rows, vocab) logits per chunk: `chunk_rows` if given, else CHUNK_ELEMENTS // vocab (at least 1),
    and with `rows` (the rows to process) at most ⌈rows / MIN_CHUNKS⌉, so that a chunk's temporaries stay small
    next to the (rows, vocab) tensors themselves also when there are few rows."""
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if chunk_rows:
        return chunk_rows
    size = max(1, CHUNK_ELEMENTS // max(1, vocab))
    return size if rows is None else max(1, min(size, -(-rows // MIN_CHUNKS)))
Kind = Literal["kl", "rkl", "js", "tv", "l1", "soft_ce"]


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Kind = "kl",
               temperature: float = 1.0) -> torch.Tensor:
    """Eqs. (1)-(6) per position: logits (..., V) -> (...), in float32 or wider; the teacher is detached."""
    check_kind(kind)
    check_same_vocabulary(student_logits, teacher_logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits.dtype)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if kind == "kl":
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if kind == "rkl":
        return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    if kind == "soft_ce":
        return -(log_t.exp() * log_s).sum(-1)
    if kind == "js":
        log_m = torch.logaddexp(log_s, log_t) - math.log(2.0)
        return 0.5 * (F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
                      + F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1))
    l1 = (log_s.exp() - log_t.exp()).abs().sum(-1)
    return 0.5 * l1 if kind == "tv" else l1


def rowwise_values(fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor | None, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn(x[rows], y[rows]) chunk by chunk, without a graph."""
    with torch.no_grad():
        parts = [fn(x[part], None if y is None else y[part]) for part in rows.split(chunk)]
        return torch.cat(parts) if parts else fn(x[:0], None if y is None else y[:0])


class _Rowwise(torch.autograd.Function):
    """out = fn(x[rows], y[rows]) computed `chunk` rows at a time: the forward without a graph, the backward
    recomputing one chunk at a time (activation checkpointing over rows). Only x gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor | None, rows: torch.Tensor, chunk: int,
                fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, y, rows)
        ctx.chunk, ctx.fn = chunk, fn
        return rowwise_values(fn, x, y, rows, chunk)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, y, rows = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        for part, grad_part in zip(rows.split(ctx.chunk), grad.split(ctx.chunk), strict=True):
            with torch.enable_grad():
                rows_x = x[part].detach().requires_grad_()
                out = ctx.fn(rows_x, None if y is None else y[part])
                (grad_rows,) = torch.autograd.grad(out, rows_x, grad_part)
            grad_x.index_add_(0, part, grad_rows)
        return grad_x, None, None, None, None


def rowwise(fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], x: torch.Tensor,
            y: torch.Tensor | None = None, rows: torch.Tensor | None = None,
            chunk_rows: int | None = None) -> torch.Tensor:
    """fn(x[rows], y[rows]) for x (R, V) and y (R, V) (no gradient; may be None), `chunk_rows` rows at a time,
    differentiable in x; `fn` maps (r, V) rows to (r, ...) and must treat rows independently. Memory beyond x
    and its gradient: one chunk's temporaries (the backward recomputes them). `rows` (T,): indices into R (all
    when None; repeats allowed). `chunk_rows` None: `chunk_rows_for(V)`."""
    chunk_rows = chunk_rows_for(x.shape[-1], chunk_rows)
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    y = None if y is None else y.detach()
    if not (torch.is_grad_enabled() and x.requires_grad):
        return rowwise_values(fn, x, y, rows, chunk_rows)
    return _Rowwise.apply(x, y, rows, chunk_rows, fn)


def reduce_positions(values: torch.Tensor, mask: torch.Tensor | None = None,
                     num_items_in_batch: torch.Tensor | int | None = None,
                     reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """Eq. (7): per-position `values` (...) reduced over the positions `mask` counts (all when None)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the positions have shape {tuple(values.shape)}")
        values = torch.where(mask.bool(), values, 0.0)
    if reduction == "none":
        return values
    total = values.sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device).to(total.dtype)
    if reduction == "sum":
        return total
    count = values.numel() if mask is None else mask.bool().sum()
    return total / torch.as_tensor(count, device=total.device).clamp_min(1).to(total.dtype)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Kind = "kl",
            temperature: float = 1.0, mask: torch.Tensor | None = None,
            num_items_in_batch: torch.Tensor | int | None = None,
            reduction: Literal["mean", "sum", "none"] = "mean", tau_squared: bool = False,
            chunk_rows: int | None = None) -> torch.Tensor:
    """The distillation loss `kind` (eqs. 1-6) between logits (..., V) at `temperature`, reduced by eq. (7):
    the mean over the positions `mask` (...) counts, or their sum / `num_items_in_batch` when that is given
    (causal LMs under gradient accumulation), times τ² with `tau_squared`. A teacher whose last dimension
    differs from the student's raises ValueError naming both sizes. Only the counted rows go through the
    softmax, `chunk_rows` at a time (`rowwise`)."""
    check_same_vocabulary(student_logits, teacher_logits)
    check_kind(kind)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    positions = student_logits.shape[:-1]
    if mask is not None and mask.shape != positions:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the logits have positions {tuple(positions)}")
    vocab = student_logits.shape[-1]
    rows = None if mask is None else mask.reshape(-1).bool().nonzero().squeeze(1)
    counted = rowwise(lambda s, t: divergence(s, t, kind, temperature), student_logits.reshape(-1, vocab),
                      teacher_logits.reshape(-1, vocab), rows, chunk_rows)
    if reduction == "none":
        values = counted if rows is None else counted.new_zeros(positions.numel()).index_put((rows,), counted)
        loss = reduce_positions(values.reshape(positions), None, None, "none")
    else:
        loss = reduce_positions(counted, None, num_items_in_batch, reduction)
    return loss * temperature**2 if tau_squared else loss
