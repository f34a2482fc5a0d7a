"""The fine-tuning side of a run: prompt/completion or chat data trained with TRL's `SFTTrainer`.

A run fine-tunes when its data are fine-tuning examples (`data.format` resolves to `prompt_completion` or
`messages`, e.g. `synthetic:arithmetic` or a JSONL file with `prompt`/`completion` columns). TRL then does
the tokenisation, the completion-only loss masks, padding (and padding-free packing where the attention
keeps examples apart), and truncation; the workbench adds its trainer additions through
`workbench.trainer.WorkbenchMixin` and reports how many examples were truncated.

The model is a pretrained one: a hub name, a local folder, or a run of this workbench
(`model.name_or_path: runs/<name>`, its newest complete checkpoint and its tokenizer; `resolve_base_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase

from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import DataConfig, ExperimentConfig
from workbench.data.finetune import load_finetune_splits, resolve_format, sft_config_fields, truncation_report
from workbench.errors import ConfigError
from workbench.layout import RUN_CONFIG, TOKENIZER_DIR
from workbench.models import load_tokenizer

FINETUNING_FORMATS = ("prompt_completion", "messages")


def is_finetuning(data: DataConfig) -> bool:
    """Whether the data are fine-tuning examples (prompt/completion or messages) rather than text to pack."""
    if data.format in FINETUNING_FORMATS:
        return True
    if data.format == "text" or data.source.startswith("synthetic:fact_world"):
        return False
    return resolve_format(data) in FINETUNING_FORMATS


def is_run_folder(path: str | Path) -> bool:
    """A folder written by `launch/train.py` (it holds the run's `config.yaml`)."""
    return (Path(path).expanduser() / RUN_CONFIG).is_file()


def resolve_base_run(cfg: ExperimentConfig, report=print, resuming: bool = False) -> ExperimentConfig:
    """`model.name_or_path: runs/<name>` -> that run's newest complete checkpoint, and (unless
    `model.tokenizer` is set) its tokenizer; the config is returned with both paths filled in, so the run's
    `config.yaml` records exactly what it started from. Any other `name_or_path` is returned unchanged.

    When `resuming`, the checkpoint the run started from (its own `config.yaml`) is kept, even if the base run
    has trained on since: adapters and optimizer state belong to that base."""
    source = cfg.model.name_or_path
    if source is None or not is_run_folder(source):
        return cfg
    started = base_run_of(cfg.run_dir) if resuming else None
    if started is not None and Path(started).parent == Path(source).expanduser().absolute():
        report(f"[workbench] resuming on the base it started from: {started}")
        tokenizer = cfg.model.tokenizer or str(Path(started).parent / TOKENIZER_DIR)
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": started,
                                                                             "tokenizer": tokenizer})})
    run = Path(source).expanduser().absolute()  # adapters record their base path: it must work from anywhere
    checkpoint = newest_complete_checkpoint(run, report=report)
    if checkpoint is None:
        raise ConfigError(f"field 'model.name_or_path': run '{source}' has no complete checkpoint to start from "
                          "(train it first, or name a checkpoint folder)")
    tokenizer = cfg.model.tokenizer or str(run / TOKENIZER_DIR)
    if not Path(tokenizer).is_dir():
        raise ConfigError(f"field 'model.name_or_path': run '{source}' has no {TOKENIZER_DIR}/ folder")
    report(f"[workbench] starting from run '{source}': {checkpoint.name}")
    model = cfg.model.model_copy(update={"name_or_path": str(checkpoint), "tokenizer": tokenizer})
    return cfg.model_copy(update={"model": model})


def base_run_of(run_dir: Path) -> str | None:
    """The checkpoint a fine-tuning run started from, as its `config.yaml` records it (None for a preset)."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()).get("model") or {}).get("name_or_path")


def finetuning_tokenizer(cfg: ExperimentConfig) -> PreTrainedTokenizerBase:
    """The pretrained model's own tokenizer (or `model.tokenizer`): fine-tuning keeps the base's vocabulary."""
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ConfigError("field 'model.name_or_path': fine-tuning data need a pretrained model (a hub name, a "
                          "folder, or a run: runs/<name>) or at least 'model.tokenizer'; a preset has neither")
    return tokenizer


PRETRAINING_ONLY = ("noise", "repetition", "span_corruption")


def sft_fields(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The `trl.SFTConfig` fields the data section decides; the `training` section may not set them too.
    Data options that only packed-text pretraining reads are a config error here, never silently ignored."""
    for option in PRETRAINING_ONLY:
        if getattr(cfg.data, option) is not None:
            raise ConfigError(f"field 'data.{option}': applies to pretraining on text, and this run fine-tunes on "
                              f"{resolve_format(cfg.data)} examples; remove it")
    if cfg.data.objective not in ("auto", "causal"):
        raise ConfigError(f"field 'data.objective': fine-tuning trains a causal LM on completions, not "
                          f"'{cfg.data.objective}'")
    fields = sft_config_fields(cfg.data, tokenizer)
    fields.pop("dataset_num_proc", None) if cfg.data.num_proc is None else None
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
