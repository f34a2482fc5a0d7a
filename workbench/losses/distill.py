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

`top_k='auto'` (the default) keeps the full vocabulary up to V = 8192 entries (the studies' tokenizers) and the
authors' top 50 (Multi-Level-OT) above. Memory, float32, for B sequences of L tokens (T ≤ B·L counted):
the full vocabulary holds about 6 (B·L × V) tensors (student and teacher distributions, their packed copies and
the softmax's gradient), gigabytes per 2k-token sequence at V = 128k; top-k builds the kept entries straight
from the logits, (B·L × (k+1)) per side, with the normalisers and the teacher's mass computed in chunks of
`CHUNK_ELEMENTS` logits (`divergences.rowwise`), so beyond the logits and their gradient it holds O(chunk + B·V).
With a KD term too, `distillation_loss` computes both from one pass (`token_kd_and_sinkhorn`) with ONE (B·L × V)
gradient buffer for the two terms, which can be the teacher's logits' own storage (`overwrite_teacher`).

    (5) L = (1 − α)·CE + α·KD + β·L_sink           (the intended SinKD recipe, §1.2; without KD: CE + β·L_sink)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch

from workbench.losses.divergences import (
    chunk_rows_for,
    divergence,
    kd_loss,
    reduce_positions,
    rowwise,
    rowwise_values,
)
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
AUTO_TOP_K = 50  # the authors' token-level recipe (Multi-Level-OT) keeps the top 50 probabilities
FULL_VOCABULARY_UP_TO = 8192  # top_k='auto': the whole vocabulary up to this size, AUTO_TOP_K above it
TopK = int | Literal["auto"] | None
RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # rows (r, V) and their other input -> (r, ...)


def resolve_top_k(top_k: TopK, vocab: int) -> int | None:
    """The k that `top_k` means for a vocabulary of `vocab` entries: None (all) or a number; 'auto' is None for
    vocab <= FULL_VOCABULARY_UP_TO, else AUTO_TOP_K."""
    if top_k == "auto":
        return None if vocab <= FULL_VOCABULARY_UP_TO else AUTO_TOP_K
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, 'auto' or None, got {top_k!r}")
    return top_k


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
    return with_rest(torch.gather(student, -1, keep)), with_rest(torch.gather(teacher, -1, keep))


def with_rest(kept: torch.Tensor) -> torch.Tensor:
    """Kept probabilities (..., k) and one more entry with the rest of the mass, 1 − Σ kept (≥ 0): (..., k+1)."""
    return torch.cat([kept, (1 - kept.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)


def kept_log_probs(logits: torch.Tensor, keep: torch.Tensor, temperature: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """The entries `keep` (r, k) of log softmax(z/τ) for logits z (r, V): z_c/τ − LSE(z/τ), in `dtype`."""
    scaled = logits.to(dtype) / temperature
    return scaled.gather(-1, keep) - torch.logsumexp(scaled, -1, keepdim=True)


def teacher_top_k(teacher_logits: torch.Tensor, index: torch.Tensor, points: torch.Tensor, top_k: int,
                  temperature: float, dtype: torch.dtype, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's side of `truncated_distributions`, without a graph: `keep_of_row` (R, k), the entries each
    flattened row keeps (its problem's top k of Σ_points softmax(z^t/τ); rows in no problem keep row 0's, masked
    later), and the teacher's kept log-probs at the points `index` (P, n), flattened to (P·n, k)."""
    problems = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    with torch.no_grad():
        mass = teacher_logits.new_zeros(index.shape[0], teacher_logits.shape[-1], dtype=dtype)
        for part, problem in zip(index[points].split(chunk_rows), problems[points].split(chunk_rows), strict=True):
            mass.index_add_(0, problem, torch.softmax(teacher_logits[part].to(dtype) / temperature, -1))
        keep = mass.topk(top_k, dim=-1).indices  # (P, k): the same entries at every point of a problem
        keep_of_row = keep.new_zeros(teacher_logits.shape[0], top_k)
        keep_of_row[index[points]] = keep[problems[points]]
        teacher = rowwise(partial(kept_log_probs, temperature=temperature, dtype=dtype), teacher_logits,
                          keep_of_row, index.reshape(-1), chunk_rows)
    return keep_of_row, teacher


def truncated_distributions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, index: torch.Tensor,
                            points: torch.Tensor, top_k: int, temperature: float, dtype: torch.dtype,
                            chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`truncate_vocabulary` of softmax(z/τ) at the points `index` (P, n) of the flattened logits (R, V), straight
    from the logits: the kept entries exp(z_c/τ − LSE(z/τ)) and the teacher's mass per problem (over its
    `points`), `chunk_rows` rows at a time (`rowwise`). Returns (P, n, k+1) twice, in `dtype`; no (P·n × V)
    float tensor is built, and the student's gradient is one (R, V) buffer in the logits' dtype."""
    chunk_rows = chunk_rows_for(student_logits.shape[-1], chunk_rows)
    keep_of_row, teacher = teacher_top_k(teacher_logits, index, points, top_k, temperature, dtype, chunk_rows)
    student = rowwise(partial(kept_log_probs, temperature=temperature, dtype=dtype), student_logits, keep_of_row,
                      index.reshape(-1), chunk_rows)
    return kept_distributions(student, index), kept_distributions(teacher, index)


def kept_distributions(kept: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Kept log-probs (P·n, k) of the points `index` (P, n) as distributions with the rest entry: (P, n, k+1)."""
    return with_rest(kept.view(*index.shape, kept.shape[-1]).exp())


def token_sinkhorn(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
                   scope: Literal["sequence", "batch", "sample"] = "sequence", temperature: float = 2.0,
                   epsilon: float = 0.1, iterations: int = 20, scaling: Literal["sum", "mean"] = "sum",
                   top_k: TopK = "auto", log_domain: bool | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None,
                   reduction: Literal["mean", "sum"] = "mean",
                   sequences: torch.Tensor | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Eqs. (1)-(4): the Sinkhorn term of a causal LM from logits (B, L, V) and the counted positions `mask`
    (B, L) (all when None; `causal_lm_mask(labels)` for a completion-only loss). The teacher is detached;
    softmax at `temperature` τ_S; `epsilon`, `iterations`, `scaling`, `log_domain` as in `sinkhorn_cost`;
    `top_k` as `resolve_top_k` reads it (the module docstring gives each setting's memory).
    `sequences` (B, L): the sequence id of each position when rows hold several (padding-free batches).
    `chunk_rows`: positions whose logits the top-k path turns into float32 at once (None: `chunk_rows_for(V)`)."""
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
    vocab = student_logits.shape[-1]
    top_k = resolve_top_k(top_k, vocab)
    index, points = sinkhorn_problems(mask, scope, sequences)
    flat_student, flat_teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if top_k is not None and top_k + 1 < vocab:
        student, teacher = truncated_distributions(flat_student, flat_teacher, index, points, top_k, temperature,
                                                   dtype, chunk_rows)
    else:
        student = torch.softmax(flat_student[index].to(dtype) / temperature, dim=-1)
        teacher = torch.softmax(flat_teacher[index].to(dtype) / temperature, dim=-1)
    return transport_term(student, teacher, points, mask, scope=scope, epsilon=epsilon, iterations=iterations,
                          scaling=scaling, log_domain=log, num_items_in_batch=num_items_in_batch, reduction=reduction)


def sinkhorn_problems(mask: torch.Tensor, scope: Literal["sequence", "batch"],
                      sequences: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The transport problems of the counted positions `mask` (B, L): `index` (P, n) into the flattened positions
    and `valid` (P, n), one problem per sequence (`pack_sequences`) or one for the whole batch."""
    if scope == "sequence":
        return pack_sequences(mask, sequences)
    index = mask.reshape(-1).nonzero().squeeze(1)[None]
    return index, torch.ones_like(index, dtype=torch.bool)


def transport_term(student: torch.Tensor, teacher: torch.Tensor, points: torch.Tensor, mask: torch.Tensor, *,
                   scope: Literal["sequence", "batch"], epsilon: float, iterations: int,
                   scaling: Literal["sum", "mean"], log_domain: bool,
                   num_items_in_batch: torch.Tensor | int | None = None,
                   reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Eq. (4): Σ_b S_b / Z from the problems' distributions (P, n, V') and valid `points` (P, n) (`mask`, the
    counted positions, gives Z for `reduction='mean'`)."""
    per_problem = sinkhorn_distance_probs(student, teacher, epsilon=epsilon, iterations=iterations, scaling=scaling,
                                          log_domain=log_domain, mask=None if scope == "batch" else points)
    total = per_problem.sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device).to(total.dtype)
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1).to(total.dtype)


class _SharedGradient(torch.autograd.Function):
    """From logits x (R, V) and the teacher's y (R, V): the KD values d_r = kd_fn(x_r, y_r) at the rows `kd_rows`
    (unique) and the student's kept log-probs kept_fn(x_i, keep_i) at the rows `kept_rows`, with ONE (R, V)
    gradient buffer for x. The forward writes each row's ∂d_r/∂x_r into it chunk by chunk (into y's own storage
    when `overwrite_teacher`: each chunk of y is read before it is overwritten), so y is not kept for the
    backward; the backward scales row r by ∂L/∂d_r in place and adds the kept entries' gradient, recomputing one
    chunk of x at a time. Exact: each d_r depends on row r only, so its gradient is linear in ∂L/∂d_r."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, kd_rows: torch.Tensor, kd_fn: RowFn,
                keep: torch.Tensor, kept_rows: torch.Tensor, kept_fn: RowFn, chunk: int,
                overwrite_teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kept = rowwise_values(kept_fn, x, keep, kept_rows, chunk)
        grad_x = y if overwrite_teacher else torch.empty_like(x)
        values = []
        for part in kd_rows.split(chunk):
            with torch.enable_grad():
                rows_x = x[part].detach().requires_grad_()
                value = kd_fn(rows_x, y[part])
                (jacobian,) = torch.autograd.grad(value.sum(), rows_x)
            values.append(value.detach())
            grad_x[part] = jacobian.to(grad_x.dtype)
        counted = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device).index_fill_(0, kd_rows, True)
        grad_x.masked_fill_(~counted[:, None], 0)
        ctx.save_for_backward(x, kd_rows, keep, kept_rows)
        ctx.grad_x, ctx.chunk, ctx.kept_fn = grad_x, chunk, kept_fn
        return torch.cat(values) if values else x.new_zeros(0, dtype=torch.float32), kept

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_values: torch.Tensor, grad_kept: torch.Tensor):
        x, kd_rows, keep, kept_rows = ctx.saved_tensors
        grad_x, ctx.grad_x = ctx.grad_x, None  # the buffer leaves the node: autograd may add into it in place
        for part, grad_part in zip(kd_rows.split(ctx.chunk), grad_values.split(ctx.chunk), strict=True):
            scaled = grad_x[part].to(grad_part.dtype) * grad_part[:, None]
            grad_x.index_copy_(0, part, scaled.to(grad_x.dtype))
        for part, grad_part in zip(kept_rows.split(ctx.chunk), grad_kept.split(ctx.chunk), strict=True):
            with torch.enable_grad():
                rows_x = x[part].detach().requires_grad_()
                (grad_rows,) = torch.autograd.grad(ctx.kept_fn(rows_x, keep[part]), rows_x, grad_part)
            grad_x.index_add_(0, part, grad_rows.to(grad_x.dtype))
        return grad_x, None, None, None, None, None, None, None, None


def kd_and_kept_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kd_rows: torch.Tensor,
                          kd_fn: RowFn, keep_of_row: torch.Tensor, kept_rows: torch.Tensor, kept_fn: RowFn,
                          chunk_rows: int, overwrite_teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """kd_fn's values (T,) at `kd_rows` (unique) and kept_fn's kept log-probs (S, k) at `kept_rows` of the
    flattened logits (R, V), `chunk_rows` rows at a time, differentiable in the student's logits through one
    (R, V) gradient buffer in their dtype (`_SharedGradient`). `overwrite_teacher`: the teacher's logits become
    that buffer when they have the student's dtype and layout (they are garbage afterwards: for callers that
    drop them), so the step holds no other (R, V) tensor for the KD term."""
    teacher_logits = teacher_logits.detach()
    if not (torch.is_grad_enabled() and student_logits.requires_grad):
        return (rowwise_values(kd_fn, student_logits, teacher_logits, kd_rows, chunk_rows),
                rowwise_values(kept_fn, student_logits, keep_of_row, kept_rows, chunk_rows))
    overwrite = overwrite_teacher and teacher_logits.dtype == student_logits.dtype and \
        teacher_logits.shape == student_logits.shape and teacher_logits.is_contiguous()
    return _SharedGradient.apply(student_logits, teacher_logits, kd_rows, kd_fn, keep_of_row, kept_rows, kept_fn,
                                 chunk_rows, overwrite)


def token_kd_and_sinkhorn(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                          kd: Literal["kl", "rkl", "js"], temperature: float, tau_squared: bool,
                          sinkhorn_temperature: float, epsilon: float, iterations: int,
                          scaling: Literal["sum", "mean"], scope: Literal["sequence", "batch"], top_k: int,
                          log_domain: bool | None, num_items_in_batch: torch.Tensor | int | None,
                          sequences: torch.Tensor | None,
                          overwrite_teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The KD term (`kd_loss` with `mask`, reduction 'mean') and the top-k Sinkhorn term (`token_sinkhorn`, k + 1
    < V) of causal-LM logits (B, L, V), equal to those two calls, with one (B·L, V) gradient buffer for both
    (`kd_and_kept_log_probs`) instead of one each, and the teacher's logits not kept for the backward."""
    mask = mask.bool()
    vocab = student_logits.shape[-1]
    chunk_rows = chunk_rows_for(vocab, rows=student_logits.shape[:-1].numel())
    dtype = compute_dtype(student_logits.dtype)
    flat_student, flat_teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    index, points = sinkhorn_problems(mask, scope, sequences)
    keep_of_row, teacher_kept = teacher_top_k(flat_teacher, index, points, top_k, sinkhorn_temperature, dtype,
                                              chunk_rows)
    kd_values, student_kept = kd_and_kept_log_probs(
        flat_student, flat_teacher, mask.reshape(-1).nonzero().squeeze(1), partial(divergence, kind=kd,
                                                                                   temperature=temperature),
        keep_of_row, index.reshape(-1), partial(kept_log_probs, temperature=sinkhorn_temperature, dtype=dtype),
        chunk_rows, overwrite_teacher)
    kd_term = reduce_positions(kd_values, None, num_items_in_batch, "mean")
    sinkhorn = transport_term(kept_distributions(student_kept, index), kept_distributions(teacher_kept, index),
                              points, mask, scope=scope, epsilon=epsilon, iterations=iterations, scaling=scaling,
                              log_domain=use_log_domain(epsilon, student_logits.dtype, log_domain),
                              num_items_in_batch=num_items_in_batch)
    return kd_term * temperature**2 if tau_squared else kd_term, sinkhorn


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
                      scope: Literal["sequence", "batch", "sample"] = "sequence", top_k: TopK = "auto",
                      log_domain: bool | None = None,
                      num_items_in_batch: torch.Tensor | int | None = None,
                      sequences: torch.Tensor | None = None,
                      overwrite_teacher: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SinKD's eq. (5) from the model's CE loss `ce` and the logits: classification logits (N, C) (the paper's
    form: KD averaged over the N samples, the batch-wise Sinkhorn over them; `scope` 'sequence' and 'batch' are
    the same there, 'sample' is the sample-wise L1), or causal-LM logits (B, L, V) with the counted positions
    `mask` (KD and Sinkhorn per token, reduced like the CE: sum / `num_items_in_batch` when given; `sequences` as
    in `token_sinkhorn`). β = 0 skips the Sinkhorn term. Returns the total and its parts (see `combine_losses`).
    Causal LMs with a KD term and the top-k Sinkhorn share one gradient buffer (`token_kd_and_sinkhorn`);
    `overwrite_teacher`: the teacher's logits may become that buffer (garbage afterwards), for callers that drop
    them after the call."""
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
    if student_logits.dim() == 3 and kd != "none" and beta != 0 and scope != "sample":
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device) \
            if mask is None else mask.bool()
        k = resolve_top_k(top_k, student_logits.shape[-1])
        if k is not None and k + 1 < student_logits.shape[-1] and mask.shape == student_logits.shape[:-1] \
                and mask.any():
            kd_term, sink = token_kd_and_sinkhorn(
                student_logits, teacher_logits, mask, kd=kd, temperature=temperature, tau_squared=tau_squared,
                sinkhorn_temperature=sinkhorn_temperature, scope=scope, top_k=k, num_items_in_batch=num_items_in_batch,
                sequences=sequences, overwrite_teacher=overwrite_teacher, **options)
            return combine_losses(ce, kd_term, sink, alpha=alpha, beta=beta)
    kd_term = None if kd == "none" else kd_loss(student_logits, teacher_logits, kd, temperature, mask,
                                                num_items_in_batch, tau_squared=tau_squared)
    sink = None if beta == 0 else token_sinkhorn(student_logits, teacher_logits, mask, scope=scope,
                                                 temperature=sinkhorn_temperature, top_k=top_k,
                                                 num_items_in_batch=num_items_in_batch, sequences=sequences,
                                                 **options)
    return combine_losses(ce, kd_term, sink, alpha=alpha, beta=beta)
