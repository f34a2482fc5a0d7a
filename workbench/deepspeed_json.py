"""What the workbench reads in a DeepSpeed JSON config before DeepSpeed does: whether it defines its own
optimizer, which LoRA+ cannot use, and the one-line error that says so.

A leaf module (no project imports): `workbench.config` checks it as the config loads and `workbench.models.lora`
as the optimizer is built, and neither imports the other for it."""

from __future__ import annotations

import json
from pathlib import Path

LORAPLUS_UNDER_DEEPSPEED_OPTIMIZER = (
    "field 'model.loraplus_lr_ratio': the DeepSpeed config has an 'optimizer' section, so DeepSpeed would build "
    "one optimizer at one learning rate; remove that section (the Trainer's optimizer then comes from "
    "'training': optim, learning_rate, weight_decay)"
)


def deepspeed_defines_optimizer(deepspeed_json: str | Path) -> bool:
    """Whether a DeepSpeed JSON config has its own 'optimizer' section, which LoRA+ cannot use (the Trainer
    hands DeepSpeed its optimizer only when there is none); False for a file that does not parse."""
    try:
        return "optimizer" in json.loads(Path(deepspeed_json).read_text())
    except (OSError, ValueError, TypeError):
        return False
