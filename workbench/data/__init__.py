"""Dataset builders: documents from any source -> a locally trained (or given) tokenizer -> packed blocks.

Everything built here is cached under `data.cache_dir`, keyed by what it was built from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerBase

from workbench.data.loading import load_documents, map_processes
from workbench.data.noise import NoiseConfig, corrupt_documents
from workbench.data.packing import split_documents, tokenize_and_pack
from workbench.io import publish_folder
from workbench.models import load_or_train_tokenizer, load_tokenizer

if TYPE_CHECKING:  # annotations only: workbench.config imports this package (to check data options), not the reverse
    from workbench.config import DataConfig, ModelConfig

__all__ = ["documents", "fact_world_options", "load_documents", "prepare_data", "split_documents", "tokenize_and_pack"]


def _source_key(cfg: DataConfig) -> dict:
    """What identifies the documents: the data config (less what is applied after packing: repetition and the
    objective), plus size and mtime of local files."""
    key = cfg.model_dump(exclude={"num_proc", "cache_dir", "block_size", "repetition", "objective", "span_corruption",
                                     "format", "prompt_column", "completion_column", "messages_column", "packing"})
    path = Path(cfg.source).expanduser()
    if path.exists():
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        key["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return key


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fact_world_options(data: dict) -> dict:
    """What the evaluator needs to know of a run's fact world: its generator options and which documents the
    run held out (`data` is the `data` section as a dict); empty when the run did not train on the fact world."""
    if not str(data.get("source", "")).startswith("synthetic:fact_world"):
        return {}
    return {**data.get("synthetic", {}), "validation_fraction": data.get("validation_fraction", 0.05),
            "split_seed": data.get("split_seed", 0), "max_documents": data.get("max_documents")}


def documents(data: DataConfig, noised: bool = True) -> DatasetDict:
    """Train/validation documents; with `data.noise` (and `noised`), the training documents corrupted."""
    splits = split_documents(load_documents(data), data.validation_fraction, data.split_seed)
    if noised and data.noise is not None:
        splits["train"] = corrupt_documents(splits["train"], NoiseConfig(**data.noise))
    return splits


def prepare_data(data: DataConfig, model: ModelConfig) -> tuple[PreTrainedTokenizerBase, DatasetDict]:
    """The tokenizer and the packed `train`/`validation` blocks (column `input_ids`), built or from cache.

    A tokenizer trained here learns from the clean training documents, so runs with and without `data.noise`
    share it and their per-token validation losses compare."""
    cache = Path(data.cache_dir)
    source_key = _source_key(data)
    splits = None
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        clean_key = {k: v for k, v in source_key.items() if k != "noise"}
        tok_dir = cache / "tokenizers" / _digest([clean_key, model.tokenizer_vocab_size])
        if not (tok_dir / "tokenizer.json").is_file():
            splits = documents(data, noised=False)
        tokenizer = load_or_train_tokenizer(tok_dir, splits["train"]["text"] if splits else [],
                                            model.tokenizer_vocab_size)
        splits = splits if data.noise is None else None  # the packed blocks are made of the noised text
    tokenizer_key = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_key = tokenizer_key.to_str() if tokenizer_key else [tokenizer.name_or_path, len(tokenizer)]
    blocks_dir = cache / "blocks" / _digest([source_key, data.block_size, tokenizer_key])
    if (blocks_dir / "dataset_dict.json").is_file():
        return tokenizer, load_from_disk(str(blocks_dir))
    if splits is None:
        splits = documents(data)
    processes, why = map_processes(data.num_proc, sum(len(split) for split in splits.values()))
    print(why)
    blocks = tokenize_and_pack(splits, tokenizer, data.block_size, processes)
    publish_folder(blocks_dir, lambda tmp: blocks.save_to_disk(str(tmp)))
    return tokenizer, load_from_disk(str(blocks_dir))
