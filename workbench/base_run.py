"""A run of this workbench as the starting point of another: `model.name_or_path: runs/<name>` means that run's
newest complete checkpoint and its tokenizer, for every kind of run (fine-tuning a pretrained run, classifying
with it, distilling from it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from workbench.checkpoints import newest_complete_checkpoint
from workbench.config import ExperimentConfig
from workbench.errors import ConfigError
from workbench.layout import RUN_CONFIG, TOKENIZER_DIR


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
