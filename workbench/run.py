"""Build and train one experiment from its config: arguments, data, model, methods, trainer, resume."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import TrainingArguments, set_seed

from workbench.base_run import resolve_base_run
from workbench.callbacks import MetricsJsonlCallback, SaveAtStepsCallback
from workbench.checkpoints import (
    complete_checkpoints,
    list_checkpoints,
    verify_rank_files,
    verify_shared_files,
)
from workbench.config import ExperimentConfig, dump_config, resolve_path
from workbench.distributed_launch import release_shared_memory
from workbench.errors import CheckpointError, ConfigError, WorkbenchError
from workbench.kinds import RunKind, kind_for
from workbench.layout import METRICS, RUN_CONFIG, TENSORBOARD_DIR, TOKENIZER_DIR
from workbench.methods import build_methods, check_methods_on_model
from workbench.methods.stack import MethodStack
from workbench.models.presets import PRESETS
from workbench.precision import choose_precision

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
    kind: str = "pretrain"  # the run kind's name (workbench.kinds): "pretrain", "finetune", "classification"
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


def training_arguments(cfg: ExperimentConfig, precision: str, kind: RunKind | None = None) -> TrainingArguments:
    """`TrainingArguments` (or the kind's subclass of it, e.g. TRL's `SFTConfig`) from the `training` section
    plus what the workbench manages and what the run's kind decides (`RunKind.argument_fields`)."""
    fields = {**TRAINING_DEFAULTS, **cfg.training}
    arguments_class = TrainingArguments
    if kind is not None:
        fields, arguments_class = kind.argument_fields(fields), kind.arguments_class()
    os.environ["TENSORBOARD_LOGGING_DIR"] = USER_TENSORBOARD_DIR or str(cfg.run_dir / TENSORBOARD_DIR)
    deepspeed = str(resolve_path(cfg.deepspeed)) if cfg.deepspeed else None
    try:
        return arguments_class(
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
    two ranks. `args.device` starts the process group; `deepspeed.init_distributed` then wraps it (and on CPU
    maps its shared-memory buffers, whose names are released at once: `release_shared_memory`)."""
    _ = args.device
    if args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), timeout=args.ddp_timeout_delta)
        torch.distributed.barrier()  # every rank has mapped every rank's CPU all-reduce buffer: unlink this one's
        release_shared_memory()


def find_resume_checkpoint(cfg: ExperimentConfig, resume: bool, report=print) -> str | None:
    """The checkpoint to resume from, the same on every rank: 'auto' = the newest complete one, a path = that one.

    Rank 0 proposes a checkpoint whose files every rank reads are whole (`verify_shared_files`); every rank checks
    its own files in it (`verify_rank_files`: on a shared file system a node may see stale sizes of the files
    another node wrote). Under 'auto' a checkpoint broken on any rank is reported and the next older one proposed;
    a given path must be whole on every rank. Every rank gets the same answer or raises the same one-line error.
    With a process group up these are collectives (an object broadcast and gather per proposal): every rank calls
    this."""
    target = cfg.resume_from_checkpoint or ("auto" if resume else None)
    if target is None:
        return None
    rank = torch.distributed.get_rank() if _in_process_group() else 0
    proposals = _rank0_proposals(cfg.run_dir, target, report) if rank == 0 else None
    while True:
        proposal = _from_rank0(_next_proposal(proposals))
        if isinstance(proposal, WorkbenchError):
            raise proposal
        if proposal is None:
            report(f"no complete checkpoint in '{cfg.run_dir}': starting from scratch")
            return None
        problems = [problem for problem in _from_every_rank(_rank_problem(proposal, rank)) if problem]
        if not problems:
            return str(proposal)
        if target != "auto":
            raise CheckpointError(problems[0])
        report(f"skipping {problems[0]}")


def _rank0_proposals(run_dir: Path, target: str, report) -> Iterator[Path]:
    """Rank 0's candidates for the resume, newest first: for 'auto' every checkpoint of `run_dir` whose shared files
    verify (each broken one reported), else the path `target` (ConfigError if absent, CheckpointError if broken)."""
    if target == "auto":
        yield from complete_checkpoints(run_dir, report, verify=verify_shared_files)
        return
    path = Path(target)
    if not path.is_dir():
        raise ConfigError(f"field 'resume_from_checkpoint': '{target}' not found")
    verify_shared_files(path)
    yield path


def _next_proposal(proposals: Iterator[Path] | None) -> Path | WorkbenchError | None:
    """Rank 0's next candidate, None when there is none left (or on other ranks), or the error that ended the
    search, to be raised on every rank."""
    if proposals is None:
        return None
    try:
        return next(proposals, None)
    except WorkbenchError as err:
        return err
    except OSError as err:  # a file system error: every rank stops with it, rather than waiting for rank 0
        return CheckpointError(f"cannot read the checkpoints to resume: {err}")


def _rank_problem(checkpoint: Path, rank: int) -> str | None:
    """Why `checkpoint` cannot be resumed on `rank` (a missing, truncated or unreadable file of its own), or None."""
    try:
        verify_rank_files(checkpoint, rank)
    except CheckpointError as err:
        return f"{err} (rank {rank})"
    return None


def _in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _from_rank0(value: object) -> object:
    """Rank 0's `value` on every rank (`broadcast_object_list`; under NCCL torch moves the pickled bytes to
    `torch.cuda.current_device()`, which the Trainer set to this rank's GPU); `value` itself without a process
    group."""
    if not _in_process_group():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _from_every_rank(value: object) -> list:
    """Every rank's `value`, in rank order (`all_gather_object`); `[value]` without a process group."""
    if not _in_process_group():
        return [value]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


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
    """metrics.jsonl always; extra save steps when the config asks. (What the model logs of itself comes with
    its methods, `workbench.models.features`; evaluation on save is the evaluator's callback, which the command
    adds: the library does not import the evaluator.)"""
    callbacks: list = [MetricsJsonlCallback(cfg.run_dir / METRICS)]
    if cfg.save_at_steps:
        callbacks.append(SaveAtStepsCallback(cfg.save_at_steps))
    return callbacks


def parameter_summary(model: torch.nn.Module) -> str:
    """'0.92M parameters (0.92M trainable)' for the model as trained (after LoRA or a method's conversion),
    counting ZeRO-3 partitioned parameters by their full size."""
    total = trainable = 0
    for param in model.parameters():
        count = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += count
        trainable += count if param.requires_grad else 0
    return f"{total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable, {100 * trainable / max(total, 1):.1f}%)"


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

    What is trained and how (data, tokenizer, model, trainer class) is the run kind's (`workbench.kinds`):
    pretraining on packed text, fine-tuning through TRL, sequence classification, or a kind of your own.
    `callbacks` are added to the run's own."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    report = print if rank0 else (lambda *_: None)
    resuming = resume or cfg.resume_from_checkpoint is not None
    cfg = resolve_base_run(cfg, report, resuming=resuming)
    kind = kind_for(cfg)(cfg, report)
    check_methods_on_model(cfg.methods, kind.architecture)  # a model a method cannot act on: before anything is written
    if rank0:
        prepare_run_dir(cfg, resume, overwrite)
    precision, why = resolve_precision(cfg, resuming)
    report(f"[workbench] precision {precision} ({why})")
    args = training_arguments(cfg, precision, kind)
    join_process_group(args)
    methods = MethodStack(build_methods(cfg.methods))  # after the process group: a method may read its rank
    pieces = kind.data(args)
    vocabulary = len(pieces.tokenizer)
    tokenizer = methods.prepare_tokenizer(pieces.tokenizer)
    set_seed(cfg.seed)
    model = kind.model(tokenizer, pieces, added_tokens=len(tokenizer) - vocabulary)
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
    return RunResult(cfg.run_dir, trainer.state.global_step, output.training_loss, eval_loss, precision,
                     kind.objective, kind.name, final.get("eval_accuracy"))
