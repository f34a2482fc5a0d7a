"""Instruction tuning with TRL's `SFTTrainer`: a base checkpoint + prompt/completion pairs -> an instruct run.

The result is laid out like a training run (config.yaml, tokenizer/, checkpoint-<step>/), so the evaluator
treats base and instruct models alike. The loss covers the completion only (TRL's default for
prompt/completion data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset

from workbench.io import atomic_write_text


@dataclass(frozen=True)
class SFTRecipe:
    """One recipe for every model, so differences between instruct models come from their bases."""

    max_steps: int = 150
    per_device_train_batch_size: int = 16
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 10
    max_length: int = 128
    seed: int = 0


def instruction_tune(base_checkpoint: Path, tokenizer_dir: Path, data: Dataset, run_dir: Path,
                     recipe: SFTRecipe, run_config: dict[str, Any]) -> Path:
    """Fine-tune `base_checkpoint` on `data` (columns prompt, completion) into `run_dir`; the final checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_checkpoint), dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(run_dir), max_steps=recipe.max_steps, per_device_train_batch_size=recipe.per_device_train_batch_size,
        learning_rate=recipe.learning_rate, lr_scheduler_type=recipe.lr_scheduler_type, warmup_steps=recipe.warmup_steps,
        max_length=recipe.max_length, seed=recipe.seed, save_strategy="steps", save_steps=recipe.max_steps,
        logging_steps=max(1, recipe.max_steps // 10), report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    config = {**run_config, "name": run_dir.name, "sft": {"base": str(base_checkpoint), **asdict(recipe)}}
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return run_dir / f"checkpoint-{recipe.max_steps}"
