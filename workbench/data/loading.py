"""Documents from anywhere the config points: the synthetic fact world, a hub dataset, a local file or folder."""

from __future__ import annotations

from pathlib import Path

import datasets
from datasets import Dataset

from workbench.config import DataConfig, looks_local
from workbench.errors import ConfigError

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def load_documents(cfg: DataConfig) -> Dataset:
    """One row per document with a `text` column, in a fixed order."""
    source = cfg.source
    if source.startswith("synthetic:"):
        docs = _synthetic(source.removeprefix("synthetic:"), cfg)
    else:
        path = Path(source).expanduser()
        if path.exists():
            docs = _local(path)
        elif looks_local(source):
            raise ConfigError(f"field 'data.source': file '{source}' not found")
        else:
            docs = _hub(source, cfg.split)
    if cfg.text_column not in docs.column_names:
        raise ConfigError(
            f"field 'data.text_column': '{cfg.text_column}' is not a column of '{source}' "
            f"(columns: {', '.join(docs.column_names)})"
        )
    docs = docs.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        docs = docs.rename_column(cfg.text_column, "text")
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    if len(docs) < 2:
        raise ConfigError(f"field 'data.source': '{source}' has {len(docs)} non-empty documents; need at least 2")
    return docs


def _synthetic(kind: str, cfg: DataConfig) -> Dataset:
    from workbench.data.synthetic import FactWorld, FactWorldConfig

    if kind != "fact_world":
        raise ConfigError(f"field 'data.source': unknown synthetic source '{kind}'; valid: synthetic:fact_world")
    options = dict(cfg.synthetic)
    sentences_per_fact = options.pop("sentences_per_fact", 3)
    try:
        world = FactWorld(FactWorldConfig(**options))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"field 'data.synthetic': {err}") from None
    return world.corpus(sentences_per_fact=sentences_per_fact)


def _local(path: Path) -> Dataset:
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.txt"))
        if not files:
            raise ConfigError(f"field 'data.source': folder '{path}' has no .txt files")
        # One document per file, in sorted order: `sample_by="document"` keeps each file whole.
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
    builder = LOCAL_FORMATS.get(path.suffix)
    if builder is None:
        raise ConfigError(
            f"field 'data.source': '{path}' has an unknown suffix; valid: {', '.join(LOCAL_FORMATS)} or a folder"
        )
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many kinds; the user needs the file and the first line
        raise ConfigError(f"field 'data.source': could not read '{path}': {str(err).splitlines()[0]}") from None


def _hub(name: str, split: str) -> Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise ConfigError(
            f"field 'data.source': '{name}' is neither a local file nor a reachable hub dataset: "
            f"{str(err).splitlines()[0]}"
        ) from None
