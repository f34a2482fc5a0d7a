"""Evaluation metrics computed inside the Trainer's evaluation loop."""

from __future__ import annotations

import numpy as np
import torch


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep only each position's most likely next token (saves memory)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def next_token_accuracy(eval_prediction) -> dict[str, float]:
    """`compute_metrics`: share of positions whose most likely next token is the actual next token.

    Position t predicts token t+1 (the causal-LM shift); positions whose label is -100 (padding) don't count.
    """
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    predicted, target = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    mask = target != -100
    return {"token_accuracy": float((predicted[mask] == target[mask]).mean()) if mask.any() else float("nan")}
