"""Evaluation metrics computed inside the Trainer's evaluation loop.

`preprocess_logits_for_metrics` keeps, per position, the most likely token and the negative log-likelihood
of the label (so the full logits never pile up in memory); `compute_metrics` then reports

- `token_accuracy`: share of counted positions whose most likely token is the label;
- `nll`: mean negative log-likelihood per counted token, in nats, without label smoothing (the Trainer's
  `eval_loss` includes `label_smoothing_factor` when it is set; `eval_nll` never does).

Causal LMs (`shift=True`) predict token t+1 at position t; encoder-decoders (`shift=False`) predict label
t at decoder position t. Positions whose label is -100 never count; `counted` narrows them further.

Memory: the label NLL is logsumexp(z) − z_label in float32, computed `chunk_rows` positions at a time, so the
evaluation never holds a float32 (B, L, V) log-softmax (33 GB for 64 sequences of 1k tokens at V = 128k); beyond
the logits it holds one chunk of float32 logits (`chunk_rows`, by default 32 MiB's worth).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from workbench.losses.divergences import chunk_rows_for


def token_predictions(shift: bool, chunk_rows: int | None = None
                      ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`preprocess_logits_for_metrics`: (..., 2) float tensor of [argmax token, label NLL] per position
    (`label_predictions`, `chunk_rows` positions at a time)."""

    def preprocess(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):  # the model's other outputs too; an MoE's aux_loss (a scalar) may come first
            logits = next(t for t in logits if isinstance(t, torch.Tensor) and t.dim() == labels.dim() + 1)
        if not shift:
            return label_predictions(logits, labels, chunk_rows)
        # position t is scored against label t+1; the last position has no label (scored against -100, dropped)
        targets = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
        return label_predictions(logits, targets, chunk_rows)[..., :-1, :]

    return preprocess


def label_predictions(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
                      ) -> torch.Tensor:
    """[argmax token, −log softmax(z)_label] per position of logits (..., V) and labels (...), as float32
    (..., 2); NLL = logsumexp(z) − z_label in float32, `chunk_rows` positions at a time. Labels of -100 get the
    NLL of token 0 (they never count). `chunk_rows` None: `chunk_rows_for(V)` (32 MiB of float32 logits)."""
    vocab = logits.shape[-1]
    chunk_rows = chunk_rows_for(vocab, chunk_rows)
    rows, targets = logits.reshape(-1, vocab), labels.reshape(-1, 1).clamp(min=0)
    out = torch.empty(rows.shape[0], 2, dtype=torch.float32, device=logits.device)
    for start in range(0, rows.shape[0], chunk_rows):
        part = rows[start:start + chunk_rows]
        out[start:start + chunk_rows, 0] = part.argmax(dim=-1).float()
        label_logit = part.gather(-1, targets[start:start + chunk_rows]).squeeze(-1).float()
        out[start:start + chunk_rows, 1] = torch.logsumexp(part.float(), dim=-1) - label_logit
    return out.view(*logits.shape[:-1], 2)


def token_metrics(shift: bool, counted: Callable[[np.ndarray], np.ndarray] | None = None):
    """`compute_metrics` over the output of `token_predictions(shift)` (see the module docstring)."""

    def compute(eval_prediction) -> dict[str, float]:
        predictions, labels = np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids)
        if shift:
            labels = labels[:, 1:]
        labels = labels[:, : predictions.shape[1]]
        mask = labels != -100
        if counted is not None:
            mask &= counted(labels)
        if not mask.any():
            return {"token_accuracy": float("nan"), "nll": float("nan")}
        predicted, nll = predictions[..., 0].astype(np.int64), predictions[..., 1].astype(np.float64)
        return {"token_accuracy": float((predicted[mask] == labels[mask]).mean()), "nll": float(nll[mask].mean())}

    return compute
