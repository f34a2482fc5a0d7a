"""Build and train one experiment from its config: arguments, data, model, methods, trainer, resume."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase, TrainingArguments, set_seed

from workbench.callbacks import MetricsJsonlCallback, SaveAtStepsCallback
from workbench.checkpoints import list_checkpoints, newest_complete_checkpoint, verify_checkpoint
from workbench.classification import (
    build_classifier,
    check_classification,
    classification_collator,
    classification_metrics,
    classification_splits,
    classification_tokenizer,
    is_classification,
    tokenize,
)
from workbench.config import ExperimentConfig, dump_config, resolve_path
from workbench.data import prepare_data
from workbench.data.finetune import check_packing
from workbench.data.repetition import RepetitionConfig, repetition_stream, resolve_seed
from workbench.data.span_corruption import (
    VALIDATION_OFFSET,
    SpanCorruptionCollator,
    SpanCorruptionConfig,
    add_sentinels,
    counted_targets,
)
from workbench.errors import ConfigError
from workbench.finetune import (
    finetuning_splits,
    finetuning_tokenizer,
    is_finetuning,
    resolve_base_run,
    sft_fields,
)
from workbench.layout import METRICS, RUN_CONFIG, TENSORBOARD_DIR, TOKENIZER_DIR
from workbench.methods import Method, build_methods
from workbench.metrics import token_metrics, token_predictions
from workbench.models import build_model, is_encoder_decoder
from workbench.models.presets import PRESETS
from workbench.precision import choose_precision
from workbench.trainer import WorkbenchTrainer, sft_trainer_class

USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # a user's choice wins over run_dir/tensorboard
TRAINING_DEFAULTS = {"report_to": ["tensorboard"], "logging_steps": 10, "save_steps": 100}


@dataclass
class RunResult:
    run_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    precision: str
    objective: str = "causal"
    kind: str = "pretrain"  # or "finetune", "classification"
    eval_accuracy: float | None = None  # classification: accuracy on the held-out split


def _width(cfg: ExperimentConfig) -> int:
    if cfg.model.name_or_path is None:
        config_class, fields = PRESETS[cfg.model.preset]
        return int(config_class(**{**fields, **cfg.model.overrides}).hidden_size)  # T5's d_model too
    return 1024


def resolve_precision(cfg: ExperimentConfig, resuming: bool) -> tuple[str, str]:
    """The configured precision; `auto` measures once and a resumed run keeps what it chose."""
    saved = cfg.run_dir / RUN_CONFIG
    if cfg.precision == "auto" and resuming and saved.is_file():
        return yaml.safe_load(saved.read_text()).get("precision", "fp32"), f"as chosen at the start ({saved})"
    return choose_precision(cfg.precision, _width(cfg))


def resolve_objective(cfg: ExperimentConfig) -> str:
    """`data.objective`, with `auto` decided by the model: span corruption for encoder-decoders, else causal."""
    seq2seq = is_encoder_decoder(cfg.model)
    objective = cfg.data.objective if cfg.data.objective != "auto" else ("span_corruption" if seq2seq else "causal")
    if (objective == "span_corruption") != seq2seq:
        kind = "an encoder-decoder" if seq2seq else "a decoder-only"
        raise ConfigError(f"field 'data.objective': '{objective}' does not fit {kind} model "
                          f"({'causal needs a decoder-only' if seq2seq else 'span_corruption needs an encoder-decoder'}"
                          f" model, e.g. preset {'pythia-tiny' if seq2seq else 't5-tiny'})")
    if seq2seq and cfg.eval.on_save:
        raise ConfigError("field 'eval.on_save': the BOSE evaluator scores causal LMs and this model is an "
                          "encoder-decoder; set it to false (validation NLL and accuracy are still reported)")
    return objective


def training_arguments(cfg: ExperimentConfig, precision: str, objective: str = "causal",
                       sft: dict[str, Any] | None = None) -> TrainingArguments:
    """`TrainingArguments` from the `training` section plus what the workbench manages; with `sft` (the
    fields `workbench.finetune.sft_fields` decides), TRL's `SFTConfig`."""
    # SFTConfig's own defaults differ from TrainingArguments' (activation checkpointing on, lr 2e-5): one run
    # kind does not silently train differently from the other
    sft_defaults = {"gradient_checkpointing": False, "learning_rate": 5e-5} if sft is not None else {}
    fields = {**TRAINING_DEFAULTS, **sft_defaults, **cfg.training, **(sft or {})}
    if objective == "span_corruption" and fields.setdefault("remove_unused_columns", False):
        raise ConfigError("field 'training.remove_unused_columns': span corruption needs false (it reads example_index)")
    repeated = cfg.data.repetition is not None  # the stream is already in training order
    if repeated and fields.setdefault("train_sampling_strategy", "sequential") != "sequential":
        raise ConfigError("field 'training.train_sampling_strategy': a repetition stream needs 'sequential'")
    os.environ["TENSORBOARD_LOGGING_DIR"] = USER_TENSORBOARD_DIR or str(cfg.run_dir / TENSORBOARD_DIR)
    deepspeed = str(resolve_path(cfg.deepspeed)) if cfg.deepspeed else None
    try:
        if sft is not None:
            from trl import SFTConfig
        return (TrainingArguments if sft is None else SFTConfig)(
            output_dir=str(cfg.run_dir),
            seed=cfg.seed,
            deepspeed=deepspeed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=not torch.cuda.is_available(),
            **fields,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"field 'training': {str(err).strip().splitlines()[0]}") from None


def join_process_group(args: TrainingArguments) -> None:
    """Set up the process group before the model is built.

    Under ZeRO-3, `from_pretrained`/`from_config` build the model inside `deepspeed.zero.Init`, which reads the
    world size from DeepSpeed's communication backend. On CPU, accelerate starts `torch.distributed` itself
    (gloo) but not DeepSpeed's backend, so `zero.Init` saw a world of 1 and failed its batch-size check on
    two ranks. `args.device` starts the process group; `deepspeed.init_distributed` then wraps it."""
    _ = args.device
    if args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), timeout=args.ddp_timeout_delta)


def find_resume_checkpoint(cfg: ExperimentConfig, resume: bool, report=print) -> str | None:
    """The checkpoint to resume from: 'auto' = newest complete one, a path = that one (verified)."""
    target = cfg.resume_from_checkpoint or ("auto" if resume else None)
    if target is None:
        return None
    if target == "auto":
        checkpoint = newest_complete_checkpoint(cfg.run_dir, report=report)
        if checkpoint is None:
            report(f"no complete checkpoint in '{cfg.run_dir}': starting from scratch")
        return str(checkpoint) if checkpoint else None
    path = Path(target)
    if not path.is_dir():
        raise ConfigError(f"field 'resume_from_checkpoint': '{target}' not found")
    verify_checkpoint(path)
    return str(path)


def prepare_run_dir(cfg: ExperimentConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an earlier run unless asked to resume or overwrite it (not both: nothing deleted)."""
    if overwrite and (resume or cfg.resume_from_checkpoint):
        asked = "--resume" if resume else f"resume_from_checkpoint: {cfg.resume_from_checkpoint}"
        raise ConfigError(f"--overwrite deletes '{cfg.run_dir}' (checkpoints too) and {asked} continues it: give one")
    if overwrite and cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    if not (resume or cfg.resume_from_checkpoint) and list_checkpoints(cfg.run_dir):
        raise ConfigError(
            f"'{cfg.run_dir}' already has checkpoints: pass --resume to continue it, --overwrite to start over, "
            f"or --set name=<new name>"
        )


def run_callbacks(cfg: ExperimentConfig) -> list:
    """metrics.jsonl always; the load of a model's own learned routers (Mixtral-shaped: `router_load_*`); the
    LoRA update's norm (`lora_delta_norm`) for LoRA runs; extra save steps when
    the config asks. (Evaluation on save is the evaluator's
    callback, `workbench_eval.on_save`, which the entry point adds: the library does not import the evaluator.)"""
    from workbench.models.moe_model import RouterLoadCallback

    callbacks = [RouterLoadCallback(), MetricsJsonlCallback(cfg.run_dir / METRICS)]  # load logged before written
    if cfg.model.lora is not None:
        from workbench.models.lora import LoraDeltaNormCallback

        callbacks.append(LoraDeltaNormCallback())
    if cfg.save_at_steps:
        callbacks.append(SaveAtStepsCallback(cfg.save_at_steps))
    return callbacks


@dataclass
class DataPieces:
    """What a run trains on, in the form its trainer class reads."""

    tokenizer: PreTrainedTokenizerBase
    trainer_class: type
    train_dataset: Any
    eval_dataset: Any
    trainer_kwargs: dict[str, Any]
    description: str  # e.g. "110 training blocks of 32 tokens"


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


def prepare_tokenizer(methods: list[Method], tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Every method's `prepare_tokenizer` hook, in config order, before the model is built or resized."""
    for method in methods:
        tokenizer = method.prepare_tokenizer(tokenizer)
    return tokenizer


def parameter_summary(model: torch.nn.Module) -> str:
    """'0.92M parameters (0.92M trainable)' for the model as trained (after LoRA or a method's conversion),
    counting ZeRO-3 partitioned parameters by their full size."""
    total = trainable = 0
    for param in model.parameters():
        count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += count
        trainable += count if param.requires_grad else 0
    return f"{total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable, {100 * trainable / max(total, 1):.1f}%)"


def pretraining_pieces(cfg: ExperimentConfig, args: TrainingArguments, objective: str) -> DataPieces:
    """Packed text blocks (repetition stream, span corruption) for `WorkbenchTrainer`."""
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
    collator, metrics, train_blocks, validation = objective_pieces(cfg, objective, tokenizer, train_blocks, validation)
    kwargs = {"data_collator": collator}
    if validation is not None:
        kwargs.update(compute_metrics=metrics, preprocess_logits_for_metrics=token_predictions(objective == "causal"))
    return DataPieces(tokenizer, WorkbenchTrainer, train_blocks, validation, kwargs,
                      f"{len(train_blocks)} training blocks of {cfg.data.block_size} tokens")


def finetuning_pieces(cfg: ExperimentConfig, args: TrainingArguments, tokenizer, report) -> DataPieces:
    """Prompt/completion or chat examples for `WorkbenchSFTTrainer` (TRL tokenises, masks and pads)."""
    with args.main_process_first(desc="loading fine-tuning data"):
        splits = finetuning_splits(cfg, tokenizer, report)
    validation = splits["validation"] if len(splits["validation"]) else None
    return DataPieces(tokenizer, sft_trainer_class(), splits["train"], validation, {},
                      f"{len(splits['train'])} training examples of up to {cfg.data.block_size} tokens")


def classification_pieces(cfg: ExperimentConfig, args: TrainingArguments) -> DataPieces:
    """Texts with labels, tokenised one example a row, for `WorkbenchTrainer` (`workbench.classification`);
    the label names go to the model through `trainer_kwargs` (popped before the Trainer is built)."""
    with args.main_process_first(desc="building tokenizer and data"):
        splits, names = classification_splits(cfg.data)
        tokenizer = classification_tokenizer(cfg, splits["train"]["text"])
        splits = tokenize(splits, tokenizer, cfg.data.block_size)
    validation = splits["validation"] if len(splits["validation"]) else None
    kwargs: dict[str, Any] = {"data_collator": classification_collator(tokenizer), "label_names": names}
    if validation is not None:
        kwargs["compute_metrics"] = classification_metrics
    return DataPieces(tokenizer, WorkbenchTrainer, splits["train"], validation, kwargs,
                      f"{len(splits['train'])} training texts in {len(names)} classes, up to "
                      f"{cfg.data.block_size} tokens")


def final_evaluation(trainer) -> dict[str, float]:
    """The validation metrics of the trained model: those of the Trainer's own evaluation at the last step
    when it ran one (the same weights and data give the same numbers, so evaluating again only costs time),
    else a new `trainer.evaluate()`. With `load_best_model_at_end` the weights changed after that
    evaluation, so it always evaluates again."""
    state = trainer.state
    at_end = [record for record in state.log_history
              if record.get("step") == state.global_step and any(key.startswith("eval_") for key in record)]
    if not at_end or trainer.args.load_best_model_at_end:
        return trainer.evaluate()
    return {key: value for record in at_end for key, value in record.items() if key.startswith("eval_")}


def train(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False,
          callbacks: list | None = None) -> RunResult:
    """Train `cfg` end to end; every rank calls this (under `deepspeed` or plain `python`).

    Pretraining (text packed into blocks, `WorkbenchTrainer`) or fine-tuning (prompt/completion or chat
    examples, `WorkbenchSFTTrainer`) or sequence classification (texts with labels, `WorkbenchTrainer`),
    decided by the data; `callbacks` are added to the run's own."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    report = print if rank0 else (lambda *_: None)
    cfg = resolve_base_run(cfg, report, resuming=resume or cfg.resume_from_checkpoint is not None)
    classify = is_classification(cfg.data)
    if classify:
        check_classification(cfg)
    finetune = not classify and is_finetuning(cfg.data)
    tokenizer = finetuning_tokenizer(cfg) if finetune else None
    sft = sft_fields(cfg, tokenizer) if finetune else None
    if rank0:
        prepare_run_dir(cfg, resume, overwrite)
    precision, why = resolve_precision(cfg, resume or cfg.resume_from_checkpoint is not None)
    report(f"[workbench] precision {precision} ({why})")
    objective = "classification" if classify else "causal" if finetune else resolve_objective(cfg)
    args = training_arguments(cfg, precision, objective, sft)
    join_process_group(args)
    methods = build_methods(cfg.methods)
    if classify:
        pieces = classification_pieces(cfg, args)
    elif finetune:
        pieces = finetuning_pieces(cfg, args, tokenizer, report)
    else:
        pieces = pretraining_pieces(cfg, args, objective)
    label_names = pieces.trainer_kwargs.pop("label_names", None)
    vocabulary = len(pieces.tokenizer)
    tokenizer = prepare_tokenizer(methods, pieces.tokenizer)
    set_seed(cfg.seed)
    if classify:
        model = build_classifier(cfg, tokenizer, label_names)
    else:
        model = build_model(cfg.model, tokenizer, added_tokens=len(tokenizer) - vocabulary)
    if finetune and cfg.data.packing:
        check_packing(model)
    trainer = pieces.trainer_class(
        model=model,
        args=args,
        train_dataset=pieces.train_dataset,
        eval_dataset=pieces.eval_dataset,
        processing_class=tokenizer,
        callbacks=run_callbacks(cfg) + list(callbacks or []),
        methods=methods,
        **pieces.trainer_kwargs,
    )
    checkpoint = find_resume_checkpoint(cfg, resume, report=report)
    if rank0:
        dump_config(cfg.model_copy(update={"precision": precision}), cfg.run_dir / RUN_CONFIG)
        tokenizer.save_pretrained(str(cfg.run_dir / TOKENIZER_DIR))
    report(f"[workbench] {cfg.name}: {parameter_summary(trainer.model)}, {pieces.description}"
           + (f", resuming from {checkpoint}" if checkpoint else ""))
    output = trainer.train(resume_from_checkpoint=checkpoint)
    final = final_evaluation(trainer) if pieces.eval_dataset is not None else {}
    eval_loss = final.get("eval_nll", final.get("eval_loss"))  # plain NLL even under label smoothing
    kind = "classification" if classify else "finetune" if finetune else "pretrain"
    return RunResult(cfg.run_dir, trainer.state.global_step, output.training_loss, eval_loss, precision, objective,
                     kind, final.get("eval_accuracy"))
