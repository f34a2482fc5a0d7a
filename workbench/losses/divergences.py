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
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from workbench.losses.sinkhorn import check_same_vocabulary, compute_dtype

KINDS = ("kl", "rkl", "js", "tv", "l1", "soft_ce")
REDUCTIONS = ("mean", "sum", "none")
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
            reduction: Literal["mean", "sum", "none"] = "mean", tau_squared: bool = False) -> torch.Tensor:
    """The distillation loss `kind` (eqs. 1-6) between logits (..., V) at `temperature`, reduced by eq. (7):
    the mean over the positions `mask` (...) counts, or their sum / `num_items_in_batch` when that is given
    (causal LMs under gradient accumulation), times τ² with `tau_squared`. A teacher whose last dimension
    differs from the student's raises ValueError naming both sizes."""
    check_same_vocabulary(student_logits, teacher_logits)
    if mask is not None and reduction != "none":
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the logits have positions "
                             f"{tuple(student_logits.shape[:-1])}")
        mask = mask.bool()  # only the counted rows go through the softmax (prompt and padding never do)
        values = divergence(student_logits[mask], teacher_logits[mask], kind, temperature)
        loss = reduce_positions(values, None, num_items_in_batch, reduction)
    else:
        values = divergence(student_logits, teacher_logits, kind, temperature)
        loss = reduce_positions(values, mask, num_items_in_batch, reduction)
    return loss * temperature**2 if tau_squared else loss
