"""The sequence-classification side of a run: texts with labels, a model with a classification head.

A run classifies when its data have labels: `data.label_column` is set (any source with that column and
`data.text_column`), or the source is a generator of labelled rows (`synthetic:fact_tf`, `synthetic:fact_value`, column `label`).
It is decided from the config alone, like `workbench.kinds.finetuning.is_finetuning`, and tried first.

    data: {source: synthetic:fact_tf, synthetic: {num_entities: 60}, block_size: 32}
    model: {preset: pythia-tiny}            # or name_or_path: a hub model, a folder, or runs/<name>

The model is `AutoModelForSequenceClassification` built from the preset's config (or loaded from
`model.name_or_path`, a causal LM's checkpoint gets a new head), with `num_labels` from the training split and
`pad_token_id` from the tokenizer (GPT-NeoX and Llama classify at the last non-pad token and need it). Texts
are tokenised and cut to `data.block_size` tokens, one example per row (no packing), padded per batch by
`DataCollatorWithPadding`; the plain workbench Trainer trains it with the model's cross-entropy. Labels are
integers 0..C-1 (booleans count as 0/1), or strings, numbered in sorted order (the model's `id2label`).

The held-out split (`data.validation_fraction`, seeded by `data.split_seed`, statements that also occur in
training dropped) is evaluated at the end of the run (and whenever `training.eval_strategy` asks):
`eval_accuracy` (share of argmax predictions equal to the label) and `eval_nll` (mean cross-entropy in nats,
without label smoothing), beside the Trainer's `eval_loss`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from workbench.config import DataConfig, ExperimentConfig
from workbench.errors import ConfigError
from workbench.kinds import DataPieces, RunKind, register_kind, weights_options
from workbench.trainer import WorkbenchTrainer

KIND = "classification"
DEFAULT_LABEL_COLUMN = "label"
# data options of other run kinds: pretraining on packed text, or fine-tuning with TRL
OTHER_KINDS_ONLY = {"noise": "pretraining", "repetition": "pretraining", "span_corruption": "pretraining",
                    "packing": "fine-tuning", "prompt_column": "fine-tuning", "completion_column": "fine-tuning",
                    "messages_column": "fine-tuning"}


def is_classification(data: DataConfig) -> bool:
    """Whether the run classifies texts: a label column is configured, or the generator gives labelled rows."""
    if data.label_column is not None:
        return True
    if data.source.startswith("synthetic:"):
        from workbench.data.loading import GENERATORS

        found = GENERATORS.get(data.source.removeprefix("synthetic:"))
        return found is not None and found.kind == KIND
    return False


def label_column(data: DataConfig) -> str:
    return data.label_column or DEFAULT_LABEL_COLUMN


def check_classification(cfg: ExperimentConfig) -> None:
    """Options that other run kinds read and a classification run would silently ignore: a ConfigError naming
    the first one (nothing is loaded)."""
    data = cfg.data
    for option, kind in OTHER_KINDS_ONLY.items():
        if option in data.model_fields_set and getattr(data, option) not in (None, False):
            raise ConfigError(f"field 'data.{option}': applies to {kind}, and this run classifies texts "
                              f"('{data.text_column}', labels '{label_column(data)}'); remove it")
    if data.format not in ("auto", "text"):
        raise ConfigError(f"field 'data.format': a classification run reads texts and labels, not {data.format} "
                          "examples; use auto (or text), or remove data.label_column to fine-tune")
    if data.objective not in ("auto", "causal"):
        raise ConfigError(f"field 'data.objective': a classification run trains a classification head, not "
                          f"'{data.objective}'; remove it")
    if cfg.model.lora is not None:
        raise ConfigError("field 'model.lora': LoRA is not supported for classification runs (the new head "
                          "would not train); remove it")
    # eval.on_save on a classification run: refused by the evaluator (workbench_eval.on_save.check_on_save)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def labelled_rows(data: DataConfig) -> tuple[Dataset, list[str]]:
    """Columns text and labels (integers 0..C-1) of every non-empty row, and the C label names."""
    from workbench.data.loading import load_rows, missing_column

    rows = load_rows(data)
    column = label_column(data)
    for field, name in (("text_column", data.text_column), ("label_column", column)):
        if name not in rows.column_names:
            raise missing_column(field, name, data.source, rows.column_names)
    rows = rows.select_columns([data.text_column, column])
    rows = rows.filter(lambda batch: [bool(t and str(t).strip()) for t in batch[data.text_column]], batched=True)
    if data.max_documents is not None:
        rows = rows.select(range(min(data.max_documents, len(rows))))
    values = rows[column]
    if any(v is None for v in values):
        raise ConfigError(f"field 'data.label_column': column '{column}' of '{data.source}' has empty labels")
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        if min(values) < 0:
            raise ConfigError(f"field 'data.label_column': integer labels must be >= 0, '{column}' has {min(values)}")
        names, ids = [str(i) for i in range(int(max(values)) + 1)], [int(v) for v in values]
    elif all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        ids = [index[v] for v in values]
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise ConfigError(f"field 'data.label_column': labels must be integers or strings, column '{column}' has "
                          f"{', '.join(kinds)}")
    if len(names) < 2:
        raise ConfigError(f"field 'data.label_column': column '{column}' has {len(names)} label; need at least 2")
    texts = [str(t) for t in rows[data.text_column]]
    return Dataset.from_dict({"text": texts, "labels": ids}), names


def classification_splits(data: DataConfig) -> tuple[DatasetDict, list[str]]:
    """Train/held-out rows (`data.validation_fraction`, held-out texts that also occur in training dropped)."""
    from workbench.data.packing import split_documents

    rows, names = labelled_rows(data)
    splits = split_documents(rows, data.validation_fraction, data.split_seed)
    if len(splits["train"]) < 2:
        raise ConfigError(f"field 'data.source': '{data.source}' has {len(splits['train'])} training rows")
    return splits, names


def classification_tokenizer(cfg: ExperimentConfig, train_texts: list[str]) -> PreTrainedTokenizerBase:
    """The configured tokenizer, else a BPE trained on the training texts (cached like pretraining's, keyed by
    the data and the vocabulary size, so a teacher and a student of the same data share it)."""
    from workbench.data import _digest, _source_key
    from workbench.models import load_or_train_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is not None:
        return tokenizer
    key = {k: v for k, v in _source_key(cfg.data).items() if k != "noise"}
    directory = Path(cfg.data.cache_dir) / "tokenizers" / _digest([key, cfg.model.tokenizer_vocab_size])
    return load_or_train_tokenizer(directory, train_texts, cfg.model.tokenizer_vocab_size)


def tokenize(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """input_ids and attention_mask of each text, cut to `max_length` tokens; labels kept."""
    return splits.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
                      batched=True, remove_columns=["text"], desc="Tokenising")


def classification_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics`: accuracy of the argmax and the mean NLL of the label (nats) over the held-out rows."""
    logits = eval_prediction.predictions
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    labels = np.asarray(eval_prediction.label_ids).astype(np.int64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return {"accuracy": float((logits.argmax(-1) == labels).mean()),
            "nll": float(-log_probs[np.arange(len(labels)), labels].mean())}


def classification_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorWithPadding(tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def build_classifier(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, names: list[str],
                     dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """`AutoModelForSequenceClassification` with len(names) labels: a fresh preset sized to the tokenizer, or the
    model at `model.name_or_path` in `dtype` (`workbench.models.training_weights_dtype`; a new head where it has
    none), with the tokenizer's pad_token_id."""
    from workbench.models.presets import preset_config

    labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)},
              "pad_token_id": tokenizer.pad_token_id}
    model_cfg = cfg.model
    if model_cfg.name_or_path is None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
        config = preset_config(model_cfg.preset, len(tokenizer), special, **model_cfg.overrides)
        for key, value in labels.items():
            setattr(config, key, value)
        return AutoModelForSequenceClassification.from_config(config)
    source = model_cfg.name_or_path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code,
                                            **model_cfg.overrides)
        saved = getattr(config, "num_labels", None) if _has_classifier(config) else None
        if saved is not None and saved != len(names):
            raise ConfigError(f"field 'model.name_or_path': '{source}' classifies into {saved} labels and the data "
                              f"have {len(names)} ({', '.join(names)})")
        for key, value in labels.items():
            setattr(config, key, value)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model '{source}' could not be loaded: {str(err).splitlines()[0]}") from None
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(f"tokenizer '{model_cfg.tokenizer or source}' has {len(tokenizer)} tokens but model "
                          f"'{source}' has only {rows} embedding rows: use the model's own tokenizer")
    return model.train()


def _has_classifier(config: Any) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or [])


@register_kind()
class Classification(RunKind):
    """Texts with labels, tokenised one example a row, for `WorkbenchTrainer`; the label names size the head."""

    name = KIND

    def architecture(self) -> tuple[Any, type]:
        from workbench.models import architecture

        return architecture(self.cfg.model, AutoModelForSequenceClassification)

    @classmethod
    def matches(cls, cfg: ExperimentConfig) -> bool:
        return is_classification(cfg.data)

    def check(self) -> None:
        check_classification(self.cfg)
        self.objective = KIND

    def data(self, args: TrainingArguments) -> DataPieces:
        cfg = self.cfg
        with args.main_process_first(desc="building tokenizer and data"):
            splits, names = classification_splits(cfg.data)
            tokenizer = classification_tokenizer(cfg, splits["train"]["text"])
            splits = tokenize(splits, tokenizer, cfg.data.block_size)
        validation = splits["validation"] if len(splits["validation"]) else None
        kwargs: dict[str, Any] = {"data_collator": classification_collator(tokenizer)}
        if validation is not None:
            kwargs["compute_metrics"] = classification_metrics
        return DataPieces(tokenizer, WorkbenchTrainer, splits["train"], validation, kwargs,
                          f"{len(splits['train'])} training texts in {len(names)} classes, up to "
                          f"{cfg.data.block_size} tokens", model_options=weights_options(args, label_names=names))

    def model(self, tokenizer: PreTrainedTokenizerBase, pieces: DataPieces, added_tokens: int) -> PreTrainedModel:
        return build_classifier(self.cfg, tokenizer, pieces.model_options["label_names"], pieces.model_options["dtype"])
