"""Distillation losses: the batch-wise Sinkhorn distance of SinKD, KL/RKL/JS/TV divergences, their causal-LM
token-level forms and the combined objective (1−α)·CE + α·KD + β·Sinkhorn.

    from workbench.losses import kd_loss, sinkhorn_distance
    loss = kd_loss(student_logits, teacher_logits, "kl", temperature=2.0)             # mean KL(t‖s) over samples
    sink = sinkhorn_distance(student_logits, teacher_logits)                           # N·⟨P, W⟩, τ_S = 2, ε = 0.1

`sinkhorn` (eqs. of the batch-wise distance, POT-compatible values), `divergences` (per-sample divergences and
the token reductions), `distill` (causal-LM scopes, top-k truncation, the combination).
"""

from workbench.losses.distill import (
    IGNORE_INDEX,
    causal_lm_mask,
    combine_losses,
    distillation_loss,
    pack_sequences,
    token_sinkhorn,
    truncate_vocabulary,
)
from workbench.losses.divergences import KINDS, divergence, kd_loss, reduce_positions
from workbench.losses.sinkhorn import (
    check_same_vocabulary,
    l1_cdist,
    sinkhorn_cost,
    sinkhorn_distance,
    sinkhorn_distance_probs,
    transport_plan,
    use_log_domain,
)

__all__ = [
    "IGNORE_INDEX", "KINDS", "causal_lm_mask", "check_same_vocabulary", "combine_losses", "distillation_loss",
    "divergence", "kd_loss", "l1_cdist", "pack_sequences", "reduce_positions", "sinkhorn_cost", "sinkhorn_distance",
    "sinkhorn_distance_probs", "token_sinkhorn", "transport_plan", "truncate_vocabulary", "use_log_domain",
]
