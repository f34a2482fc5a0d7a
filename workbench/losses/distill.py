"""SinKD for causal LMs and the combined objective: token-level Sinkhorn terms and (1−α)·CE + α·KD + β·Sinkhorn.

A causal LM's distributions are per token. Position p of the logits predicts label p+1, so the positions that count
are those whose shifted label is not -100 (the completion, without prompt or padding; `causal_lm_mask`). The
Sinkhorn term has three scopes (the project's SinKD spec, Corrections "No released decoder-only SinKD recipe"):

    (1) sequence (default): one transport problem per sequence over its n_b counted tokens (the authors' token-
        level recipe, Multi-Level-OT `Sinkhorn_seq`): S_b = ⟨P_b, W_b⟩ with W_b = cdist(s_b, t_b, p=1), n_b × n_b
    (2) batch: one problem over all T counted tokens of the batch, flattened (a T × T cost; use with top_k)
    (3) sample: each token against its own teacher distribution (a 1×1 plan), S_i = ‖s_i − t_i‖₁ (§Corrections)

with S_b scaled as `sinkhorn_cost` does (`sum`: n_b·D_b, the official doubly stochastic plan; `mean`: D_b). The
term is a sum over tokens reduced like the CE (eq. 7 of `divergences`):

    (4) L_sink = Σ_b S_b / Z,   Z = num_items_in_batch if given, else #counted tokens (`reduction='mean'`), else 1

so with `sum` it is the token-weighted mean of the per-sequence distances D_b, and with `reduction='sum'` it is the
authors' plain sum over the batch. `top_k` keeps the k vocabulary entries with the largest teacher mass in each
problem (Σ over its counted tokens; the same entries for student and teacher, so token identities stay aligned)
plus one entry holding the remaining mass 1 − Σ_top-k, so every vector is still a distribution and the L1 cost a
lower bound of the full one; k + 1 ≥ V keeps everything exactly. Costs are n × n per problem from `l1_cdist`:
no (B·L) × (B·L) × V tensor is ever built.

    (5) L = (1 − α)·CE + α·KD + β·L_sink           (the intended SinKD recipe, §1.2; without KD: CE + β·L_sink)
"""

from __future__ import annotations

from typing import Literal

import torch

from workbench.losses.divergences import kd_loss
from workbench.losses.sinkhorn import (
    check_options,
    check_same_vocabulary,
    compute_dtype,
    sinkhorn_distance,
    sinkhorn_distance_probs,
    use_log_domain,
)

IGNORE_INDEX = -100
SCOPES = ("sequence", "batch", "sample")
KD_KINDS = ("kl", "rkl", "js", "none")


def causal_lm_mask(labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: which logit positions count. Position p predicts labels[:, p+1] (transformers' shift: the last
    position predicts nothing); with `shift_labels` (already shifted, as context parallelism passes them),
    position p predicts shift_labels[:, p]."""
    if shift_labels is not None:
        return shift_labels != IGNORE_INDEX
    if labels is None:
        raise ValueError("causal_lm_mask needs labels or shift_labels")
    return torch.nn.functional.pad(labels[..., 1:] != IGNORE_INDEX, (0, 1), value=False)


def pack_sequences(mask: torch.Tensor, sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each problem's counted points are: `index` (P, n_max) into the flattened positions (B·L) and `valid`
    (P, n_max), one problem per row of `mask` (B, L), or per id of `sequences` (B, L) (nondecreasing in row-major
    order, as in padding-free batches); problems without counted points are left out."""
    rows, length = mask.shape
    ids = torch.arange(rows, device=mask.device)[:, None].expand(rows, length) if sequences is None else sequences
    positions = mask.reshape(-1).nonzero().squeeze(1)
    _, problem, counts = torch.unique_consecutive(ids.reshape(-1)[positions], return_inverse=True,
                                                  return_counts=True)
    slot = torch.arange(positions.numel(), device=mask.device) - (counts.cumsum(0) - counts)[problem]
    index = positions.new_zeros(counts.numel(), int(counts.max()))
    index[problem, slot] = positions
    return index, torch.arange(index.shape[1], device=mask.device)[None, :] < counts[:, None]


def truncate_vocabulary(student: torch.Tensor, teacher: torch.Tensor, top_k: int,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Distributions (..., n, V) cut to the `top_k` entries with the largest teacher mass over each problem's
    counted points (`mask` (..., n)), plus one entry with the rest of each vector's mass: (..., n, top_k + 1)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k + 1 >= student.shape[-1]:
        return student, teacher
    with torch.no_grad():
        mass = teacher if mask is None else teacher * mask[..., None]
        keep = mass.sum(-2).topk(top_k, dim=-1).indices[..., None, :].expand(*teacher.shape[:-1], top_k)
    parts = []
    for probs in (student, teacher):
        kept = torch.gather(probs, -1, keep)
        parts.append(torch.cat([kept, (1 - kept.sum(-1, keepdim=True)).clamp_min(0)], dim=-1))
    return parts[0], parts[1]


def token_sinkhorn(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
                   scope: Literal["sequence", "batch", "sample"] = "sequence", temperature: float = 2.0,
                   epsilon: float = 0.1, iterations: int = 20, scaling: Literal["sum", "mean"] = "sum",
                   top_k: int | None = None, log_domain: bool | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None,
                   reduction: Literal["mean", "sum"] = "mean",
                   sequences: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. (1)-(4): the Sinkhorn term of a causal LM from logits (B, L, V) and the counted positions `mask`
    (B, L) (all when None; `causal_lm_mask(labels)` for a completion-only loss). The teacher is detached;
    softmax at `temperature` τ_S; `epsilon`, `iterations`, `scaling`, `log_domain` as in `sinkhorn_cost`.
    `sequences` (B, L): the sequence id of each position when rows hold several (padding-free batches)."""
    check_same_vocabulary(student_logits, teacher_logits)
    check_options(epsilon, iterations, scaling)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if student_logits.dim() != 3:
        raise ValueError("token_sinkhorn expects logits (batch, length, vocab), got shape "
                         f"{tuple(student_logits.shape)}")
    mask = (torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
            if mask is None else mask.bool())
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the logits have positions "
                         f"{tuple(student_logits.shape[:-1])}")
    if scope == "sample":
        return kd_loss(student_logits, teacher_logits, "l1", temperature, mask, num_items_in_batch,
                       "sum" if reduction == "sum" and num_items_in_batch is None else "mean")
    log = use_log_domain(epsilon, student_logits.dtype, log_domain)
    dtype = compute_dtype(student_logits.dtype)
    teacher_logits = teacher_logits.detach()
    if not mask.any():
        return student_logits.sum() * 0.0  # nothing counts: zero, with the graph
    if scope == "sequence":
        index, points = pack_sequences(mask, sequences)
        vocab = student_logits.shape[-1]
        student, teacher = student_logits.reshape(-1, vocab)[index], teacher_logits.reshape(-1, vocab)[index]
    else:
        student, teacher, points = student_logits[mask][None], teacher_logits[mask][None], None
    student = torch.softmax(student.to(dtype) / temperature, dim=-1)
    teacher = torch.softmax(teacher.to(dtype) / temperature, dim=-1)
    if top_k is not None:
        student, teacher = truncate_vocabulary(student, teacher, top_k, points)
    per_problem = sinkhorn_distance_probs(student, teacher, epsilon=epsilon, iterations=iterations, scaling=scaling,
                                          log_domain=log, mask=points)
    total = per_problem.sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device).to(total.dtype)
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1).to(total.dtype)


def combine_losses(ce: torch.Tensor, kd: torch.Tensor | None = None, sinkhorn: torch.Tensor | None = None, *,
                   alpha: float = 0.9, beta: float = 8e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. (5): L = (1 − α)·CE + α·KD + β·Sinkhorn (CE + β·Sinkhorn without a KD term), and the unweighted
    parts, detached, for logging: {'ce', 'kd', 'sinkhorn'} (those given)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    total = ce if kd is None else (1.0 - alpha) * ce + alpha * kd
    parts = {"ce": ce.detach()}
    if kd is not None:
        parts["kd"] = kd.detach()
    if sinkhorn is not None:
        total = total + beta * sinkhorn
        parts["sinkhorn"] = sinkhorn.detach()
    return total, parts


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ce: torch.Tensor, *,
                      mask: torch.Tensor | None = None, kd: Literal["kl", "rkl", "js", "none"] = "kl",
                      temperature: float = 2.0, tau_squared: bool = False, alpha: float = 0.9, beta: float = 8e-4,
                      sinkhorn_temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20,
                      scaling: Literal["sum", "mean"] = "sum",
                      scope: Literal["sequence", "batch", "sample"] = "sequence", top_k: int | None = None,
                      log_domain: bool | None = None,
                      num_items_in_batch: torch.Tensor | int | None = None,
                      sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SinKD's eq. (5) from the model's CE loss `ce` and the logits: classification logits (N, C) (the paper's
    form: KD averaged over the N samples, the batch-wise Sinkhorn over them; `scope` 'sequence' and 'batch' are
    the same there, 'sample' is the sample-wise L1), or causal-LM logits (B, L, V) with the counted positions
    `mask` (KD and Sinkhorn per token, reduced like the CE: sum / `num_items_in_batch` when given; `sequences` as
    in `token_sinkhorn`). β = 0 skips the Sinkhorn term. Returns the total and its parts (see `combine_losses`)."""
    if kd not in KD_KINDS:
        raise ValueError(f"kd must be one of {', '.join(KD_KINDS)}, got {kd!r}")
    check_same_vocabulary(student_logits, teacher_logits)
    options = {"epsilon": epsilon, "iterations": iterations, "scaling": scaling, "log_domain": log_domain}
    if student_logits.dim() == 2:  # classification: one batch of N samples
        kd_term = None if kd == "none" else kd_loss(student_logits, teacher_logits, kd, temperature, mask,
                                                    tau_squared=tau_squared)
        if beta == 0:
            sink = None
        elif scope == "sample":
            sink = kd_loss(student_logits, teacher_logits, "l1", sinkhorn_temperature, mask,
                           reduction="sum" if scaling == "sum" else "mean")
        else:
            sink = sinkhorn_distance(student_logits, teacher_logits, temperature=sinkhorn_temperature, mask=mask,
                                     **options)
        return combine_losses(ce, kd_term, sink, alpha=alpha, beta=beta)
    kd_term = None if kd == "none" else kd_loss(student_logits, teacher_logits, kd, temperature, mask,
                                                num_items_in_batch, tau_squared=tau_squared)
    sink = None if beta == 0 else token_sinkhorn(student_logits, teacher_logits, mask, scope=scope,
                                                 temperature=sinkhorn_temperature, top_k=top_k,
                                                 num_items_in_batch=num_items_in_batch, sequences=sequences,
                                                 **options)
    return combine_losses(ce, kd_term, sink, alpha=alpha, beta=beta)
