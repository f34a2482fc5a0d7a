"""Evaluation metrics computed inside the Trainer's evaluation loop.

`preprocess_logits_for_metrics` keeps, per position, the most likely token and the negative log-likelihood
of the label (so the full logits never pile up in memory); `compute_metrics` then reports

- `token_accuracy`: share of counted positions whose most likely token is the label;
- `nll`: mean negative log-likelihood per counted token, in nats, without label smoothing (the Trainer's
  `eval_loss` includes `label_smoothing_factor` when it is set; `eval_nll` never does).

Causal LMs (`shift=True`) predict token t+1 at position t; encoder-decoders (`shift=False`) predict label
t at decoder position t. Positions whose label is -100 never count; `counted` narrows them further.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def token_predictions(shift: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`preprocess_logits_for_metrics`: (..., 2) float tensor of [argmax token, label NLL] per position."""

    def preprocess(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):  # the model's other outputs too; an MoE's aux_loss (a scalar) may come first
            logits = next(t for t in logits if isinstance(t, torch.Tensor) and t.dim() == labels.dim() + 1)
        if shift:  # position t is scored against label t+1; the last position has no label
            logits, labels = logits[:, :-1], labels[:, 1:]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.stack([logits.argmax(dim=-1).float(), nll], dim=-1)

    return preprocess


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
