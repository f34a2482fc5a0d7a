"""Which metric names a run logs, to check a study's `collect` (and its curve plots) before any run starts.

A run's `metrics.jsonl` holds what the Trainer logs (`loss`, `learning_rate`, `grad_norm`, `epoch`, and at
the end `train_runtime`, `train_loss`, `total_flos`, ...; TRL's SFTTrainer, for fine-tuning data, adds
`entropy`, `mean_token_accuracy`, `num_tokens`), the validation metrics when the run holds out validation
documents (`eval_loss`, `eval_nll`, `eval_token_accuracy` or, for a classifier, `eval_accuracy`, `eval_runtime`,
...) and whatever its methods log. Each row of the study table also gets the BOSE evaluator's columns
`task.style.metric`.

Some names cannot be known in advance: the Trainer adds more `train_*`/`eval_*` keys depending on its
arguments (memory and token-speed metrics; a name close to a known one is taken for a typo), evaluator
metric names come from its task specs, and a method logs what it logs unless its class declares
`logged_metrics`. Such a name is a warning at planning time; a name that no run can log is an error.

The evaluator owns the configs' `eval:` section, which the library keeps opaque and never reads (nor imports the
evaluator): whether a run writes an evaluator column as it trains is the evaluator's answer, given through
`EvaluatorChecks` (the study command passes `workbench_eval.config.STUDY_CHECKS`); without one, an evaluator
column is a warning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from workbench.config import ExperimentConfig
from workbench.errors import ConfigError, did_you_mean
from workbench.models.moe_model import ROUTER_LOAD_METRICS
from workbench.study.plan import StudyConfig, collected


class EvaluatorChecks(Protocol):
    """What a study's planning checks ask the evaluator about the `eval:` section it owns in every run's config."""

    def check_config(self, cfg: ExperimentConfig, path: str | Path, overrides: list[str]) -> None:
        """Check the `eval:` section of `cfg` (loaded by `load_config(path, overrides)`): a ConfigError naming
        the field and where its value came from."""

    def logs_column(self, cfg: ExperimentConfig, key: str) -> bool:
        """Whether a run of `cfg` writes the evaluator column `key` (`task.style.metric`) as it trains."""

# A run is trained by the workbench's Trainer (packed text) or, for fine-tuning data, by TRL's SFTTrainer,
# which logs entropy, mean_token_accuracy and num_tokens instead of eval_nll and eval_token_accuracy. Which one
# a run uses can depend on its data's columns, so these sets are the union of both; a key that no run logged
# after all is a warning when the runs are collected.
TRAINER_METRICS = frozenset({
    "step", "epoch", "loss", "learning_rate", "grad_norm", "num_input_tokens_seen",
    "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos",
    "entropy", "mean_token_accuracy", "num_tokens"})
EVAL_METRICS = frozenset({"eval_loss", "eval_nll", "eval_token_accuracy", "eval_accuracy", "eval_runtime",
                          "eval_samples_per_second", "eval_steps_per_second", "eval_entropy",
                          "eval_mean_token_accuracy"})
# logged only with some TrainingArguments: memory metrics, tokens per second, compile and preparation times
OPTIONAL_TRAINER_METRICS = re.compile(r"^((init|train|eval)_mem_(cpu|gpu)_(alloc|peaked)_delta|train_tokens_per_second"
                                      r"|eval_(model_preparation|jit_compilation)_time|(eval_)?aux_loss)$")


def _routed_experts(cfg: ExperimentConfig) -> int:
    """The number of experts of a preset's own learned router (Mixtral-shaped presets), after the overrides."""
    from workbench.models.presets import PRESETS

    preset = PRESETS.get(cfg.model.preset or "", (None, {}))[1]
    return int({**preset, **cfg.model.overrides}.get("num_local_experts", 1))


def run_logs(cfg: ExperimentConfig, key: str, evaluator: EvaluatorChecks | None = None) -> bool | str:
    """Whether a run of `cfg` logs `key`: True, False, or (when that cannot be known in advance) the reason
    it may. An evaluator column (`task.style.metric`) is True when `evaluator` says the run writes it."""
    validates = cfg.data.validation_fraction > 0
    if key in TRAINER_METRICS or (key in EVAL_METRICS and validates):
        return True
    if key == "lora_delta_norm" and cfg.model.lora is not None:
        return True
    if key in ROUTER_LOAD_METRICS and _routed_experts(cfg) > 1:
        return True
    if len(key.split(".")) == 3:  # an evaluator column
        if evaluator is not None and evaluator.logs_column(cfg, key):
            return True
        return "an evaluator column only if the runs' checkpoints are evaluated (eval.on_save or launch/eval.py)"
    maybe = []
    if OPTIONAL_TRAINER_METRICS.match(key) and (validates or not key.startswith("eval_")):
        maybe.append("the Trainer logs it only with some of its arguments")
    elif (key.startswith("train_") or (key.startswith("eval_") and validates)) and not did_you_mean(
            key, TRAINER_METRICS | EVAL_METRICS):  # a name close to a known one is taken for a typo
        maybe.append("the Trainer may log more train_*/eval_* keys than these checks know")
    if cfg.methods:
        from workbench.methods import method_class

        for name in cfg.methods:
            declared = getattr(method_class(name), "logged_metrics", None)
            if declared is None:
                maybe.append(f"method '{name}' may log it")
            elif key in declared:
                return True
    return "; ".join(maybe) or False


def check_metrics(study: StudyConfig, configs: Iterable[ExperimentConfig], path: Path | str,
                  on_warning: Callable[[str], None], evaluator: EvaluatorChecks | None = None) -> None:
    """Every `collect` key and `curve` plot's y is logged by some run of `configs` (the arms' distinct
    configs); raise a ConfigError naming the field for one that none can log, warn for one that may not be."""
    configs = list(configs)
    fields = [("collect", key) for key in collected(study.collect)]
    fields += [(f"plots[{i}].y", p.y) for i, p in enumerate(study.plots) if p.kind == "curve"]
    validates = any(cfg.data.validation_fraction > 0 for cfg in configs)
    known = sorted(TRAINER_METRICS | (EVAL_METRICS if validates else set()))
    for field_name, key in fields:
        answers = [run_logs(cfg, key, evaluator) for cfg in configs]
        if not configs or any(answer is True for answer in answers):
            continue
        reasons = list(dict.fromkeys(a for a in answers if isinstance(a, str)))
        if reasons:
            on_warning(f"{path}: field '{field_name}': '{key}' may not be logged by any run"
                       f"{did_you_mean(key, known)} ({'; '.join(reasons)})")
            continue
        hint = "" if validates else " (no run holds out validation data: data.validation_fraction is 0)"
        raise ConfigError(f"{path}: field '{field_name}': no run logs '{key}'{did_you_mean(key, known)}{hint}; "
                          f"a run logs {', '.join(known)}, evaluator columns task.style.metric and method metrics")
