"""Fine-tuning: prompt/completion or chat examples trained with TRL's `SFTTrainer`.

A run fine-tunes when its data are fine-tuning examples (`data.format` resolves to `prompt_completion` or
`messages`, e.g. `synthetic:arithmetic` or a JSONL file with `prompt`/`completion` columns). TRL then does
the tokenisation, the completion-only loss masks, padding (and padding-free packing where the attention
keeps examples apart), and truncation; the workbench adds its trainer additions through
`workbench.trainer.WorkbenchMixin` and reports how many examples were truncated.

The model is a pretrained one: a hub name, a local folder, or a run of this workbench
(`model.name_or_path: runs/<name>`, its newest complete checkpoint and its tokenizer; `workbench.base_run`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from workbench.config import DataConfig, ExperimentConfig
from workbench.data.finetune import (
    check_packing,
    load_finetune_splits,
    resolve_format,
    sft_config_fields,
    truncation_report,
)
from workbench.errors import ConfigError
from workbench.kinds import DataPieces, RunKind, register_kind, weights_options
from workbench.models import build_model, load_tokenizer
from workbench.trainer import sft_trainer_class

FINETUNING_FORMATS = ("prompt_completion", "messages")


def is_finetuning(data: DataConfig) -> bool:
    """Whether the data are fine-tuning examples (prompt/completion or messages) rather than text to pack."""
    if data.format in FINETUNING_FORMATS:
        return True
    if data.format == "text" or data.source.startswith("synthetic:fact_world"):
        return False
    return resolve_format(data) in FINETUNING_FORMATS


def finetuning_tokenizer(cfg: ExperimentConfig) -> PreTrainedTokenizerBase:
    """The pretrained model's own tokenizer (or `model.tokenizer`): fine-tuning keeps the base's vocabulary."""
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ConfigError("field 'model.name_or_path': fine-tuning data need a pretrained model (a hub name, a "
                          "folder, or a run: runs/<name>) or at least 'model.tokenizer'; a preset has neither")
    return tokenizer


PRETRAINING_ONLY = ("noise", "repetition", "span_corruption")


def sft_fields(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase,
               report: Callable[[str], None] = print) -> dict[str, Any]:
    """The `trl.SFTConfig` fields the data section decides; the `training` section may not set them too.
    Data options that only packed-text pretraining reads are a config error here, never silently ignored."""
    for option in PRETRAINING_ONLY:
        if getattr(cfg.data, option) is not None:
            raise ConfigError(f"field 'data.{option}': applies to pretraining on text, and this run fine-tunes on "
                              f"{resolve_format(cfg.data)} examples; remove it")
    if cfg.data.objective not in ("auto", "causal"):
        raise ConfigError(f"field 'data.objective': fine-tuning trains a causal LM on completions, not "
                          f"'{cfg.data.objective}'")
    fields = sft_config_fields(cfg.data, tokenizer, report=report)
    if "dataset_num_proc" in cfg.training:  # the user's own TRL setting wins over the data section's default
        fields.pop("dataset_num_proc")
    clash = sorted(set(fields) & set(cfg.training))
    if clash:
        raise ConfigError(f"field 'training.{clash[0]}': set by the data section for fine-tuning "
                          f"(e.g. max_length is data.block_size, packing is data.packing)")
    return fields


def finetuning_splits(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, report=print) -> DatasetDict:
    """Train/validation examples, and one line on how many `data.block_size` truncates."""
    splits = load_finetune_splits(cfg.data, tokenizer)
    truncation = truncation_report(splits["train"], tokenizer, cfg.data)
    if truncation.no_completion == truncation.total:
        raise ConfigError(f"field 'data.block_size': all {truncation.total} training examples are cut to "
                          f"{truncation.max_length} tokens before their completion starts; raise data.block_size")
    report(f"[workbench] {truncation}")
    return splits


@register_kind()
class Finetuning(RunKind):
    """Prompt/completion or chat examples for `WorkbenchSFTTrainer` (TRL tokenises, masks and pads)."""

    name = "finetune"
    # SFTConfig's own defaults differ from TrainingArguments' (activation checkpointing on, lr 2e-5): one run
    # kind does not silently train differently from the other
    SFT_DEFAULTS: dict[str, Any] = {"gradient_checkpointing": False, "learning_rate": 5e-5}

    @classmethod
    def matches(cls, cfg: ExperimentConfig) -> bool:
        return is_finetuning(cfg.data)

    def check(self) -> None:
        self.tokenizer = finetuning_tokenizer(self.cfg)
        self.sft_fields = sft_fields(self.cfg, self.tokenizer, self.report)

    def arguments_class(self) -> type[TrainingArguments]:
        from trl import SFTConfig

        return SFTConfig

    def argument_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {**self.SFT_DEFAULTS, **fields, **self.sft_fields}

    def data(self, args: TrainingArguments) -> DataPieces:
        cfg = self.cfg
        with args.main_process_first(desc="loading fine-tuning data"):
            splits = finetuning_splits(cfg, self.tokenizer, self.report)
        validation = splits["validation"] if len(splits["validation"]) else None
        return DataPieces(self.tokenizer, sft_trainer_class(), splits["train"], validation, {},
                          f"{len(splits['train'])} training examples of up to {cfg.data.block_size} tokens",
                          model_options=weights_options(args))

    def model(self, tokenizer: PreTrainedTokenizerBase, pieces: DataPieces, added_tokens: int) -> PreTrainedModel:
        model = build_model(self.cfg.model, tokenizer, added_tokens=added_tokens, dtype=pieces.model_options["dtype"])
        if self.cfg.data.packing:
            check_packing(model)
        return model
