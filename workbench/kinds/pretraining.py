"""Pretraining: text packed into blocks of `data.block_size` tokens, a causal LM (or T5 with span corruption),
the plain workbench `Trainer`. The default kind: it takes every config no other kind claims.

The data are built by `workbench.data.prepare_data` (tokenizer trained or loaded, documents split and packed,
cached); a repetition stream (`data.repetition`) reorders the training blocks; the objective decides the
collator and the token metrics: next-token prediction, or span corruption for encoder-decoders, which adds
sentinel tokens to the tokenizer and numbers every example (`example_index`) to draw its noise mask from.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from workbench.config import ExperimentConfig
from workbench.data import prepare_data
from workbench.data.repetition import RepetitionConfig, repetition_stream, resolve_seed
from workbench.data.span_corruption import (
    VALIDATION_OFFSET,
    SpanCorruptionCollator,
    SpanCorruptionConfig,
    add_sentinels,
    counted_targets,
)
from workbench.errors import ConfigError
from workbench.kinds import DataPieces, RunKind, register_kind, weights_options
from workbench.metrics import token_metrics, token_predictions
from workbench.models import build_model, is_encoder_decoder
from workbench.trainer import WorkbenchTrainer


def resolve_objective(cfg: ExperimentConfig) -> str:
    """`data.objective`, with `auto` decided by the model: span corruption for encoder-decoders, else causal."""
    seq2seq = is_encoder_decoder(cfg.model)
    objective = cfg.data.objective if cfg.data.objective != "auto" else ("span_corruption" if seq2seq else "causal")
    if (objective == "span_corruption") != seq2seq:
        kind = "an encoder-decoder" if seq2seq else "a decoder-only"
        raise ConfigError(f"field 'data.objective': '{objective}' does not fit {kind} model "
                          f"({'causal needs a decoder-only' if seq2seq else 'span_corruption needs an encoder-decoder'}"
                          f" model, e.g. preset {'pythia-tiny' if seq2seq else 't5-tiny'})")
    return objective  # eval.on_save on an encoder-decoder: refused by the evaluator (workbench_eval.on_save)


def objective_pieces(cfg: ExperimentConfig, objective: str, tokenizer, train_blocks, validation):
    """The collator and `compute_metrics` of the objective, and the datasets in the form it reads.

    Span corruption adds sentinel tokens to the tokenizer (before the model is sized to it) and numbers
    every example (`example_index`), from which its noise mask is drawn."""
    if objective == "causal":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False), token_metrics(shift=True), train_blocks, validation
    options = SpanCorruptionConfig(**(cfg.data.span_corruption or {}))
    sentinels = add_sentinels(tokenizer, options)
    train_blocks = train_blocks.add_column("example_index", list(range(len(train_blocks))))
    if validation is not None:
        validation = validation.add_column("example_index", [VALIDATION_OFFSET + i for i in range(len(validation))])
    collator = SpanCorruptionCollator(options, sentinels, tokenizer.eos_token_id, tokenizer.pad_token_id)
    metrics = token_metrics(shift=False, counted=counted_targets(min(sentinels), tokenizer.eos_token_id))
    return collator, metrics, train_blocks, validation


@register_kind()
class Pretraining(RunKind):
    """Packed text blocks (repetition stream, span corruption) for `WorkbenchTrainer`."""

    name = "pretrain"

    @classmethod
    def matches(cls, cfg: ExperimentConfig) -> bool:
        return True

    def check(self) -> None:
        self.objective = resolve_objective(self.cfg)

    def argument_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self.objective == "span_corruption" and fields.setdefault("remove_unused_columns", False):
            raise ConfigError("field 'training.remove_unused_columns': span corruption needs false (it reads "
                              "example_index)")
        repeated = self.cfg.data.repetition is not None  # the stream is already in training order
        if repeated and fields.setdefault("train_sampling_strategy", "sequential") != "sequential":
            raise ConfigError("field 'training.train_sampling_strategy': a repetition stream needs 'sequential'")
        return fields

    def data(self, args: TrainingArguments) -> DataPieces:
        cfg = self.cfg
        with args.main_process_first(desc="building tokenizer and data"):
            tokenizer, blocks = prepare_data(cfg.data, cfg.model)
        train_blocks = blocks["train"]
        if cfg.data.repetition is not None:
            try:
                repetition = resolve_seed(RepetitionConfig(**cfg.data.repetition), cfg.seed)
                train_blocks = repetition_stream(train_blocks, repetition, cfg.data.block_size)
            except ValueError as err:
                raise ConfigError(f"field 'data.repetition': {err}") from None
        validation = blocks["validation"] if len(blocks["validation"]) else None
        collator, metrics, train_blocks, validation = objective_pieces(cfg, self.objective, tokenizer, train_blocks,
                                                                       validation)
        kwargs: dict[str, Any] = {"data_collator": collator}
        if validation is not None:
            kwargs.update(compute_metrics=metrics,
                          preprocess_logits_for_metrics=token_predictions(self.objective == "causal"))
        return DataPieces(tokenizer, WorkbenchTrainer, train_blocks, validation, kwargs,
                          f"{len(train_blocks)} training blocks of {cfg.data.block_size} tokens",
                          model_options=weights_options(args))

    def model(self, tokenizer: PreTrainedTokenizerBase, pieces: DataPieces, added_tokens: int) -> PreTrainedModel:
        return build_model(self.cfg.model, tokenizer, added_tokens=added_tokens, dtype=pieces.model_options["dtype"])
