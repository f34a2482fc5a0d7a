"""Data collators, each usable alone in anyone's `Trainer` or TRL `SFTTrainer` (re-exported from the methods).

    from workbench.collators import MaskedThoughtCollator, MaskedThoughtCallback, MaskSchedule
"""

from __future__ import annotations

from workbench.methods.masked_thought import (
    MaskedThoughtCallback,
    MaskedThoughtCollator,
    MaskSchedule,
    add_mask_token,
    init_mask_embedding,
)

__all__ = ["MaskSchedule", "MaskedThoughtCallback", "MaskedThoughtCollator", "add_mask_token", "init_mask_embedding"]
