"""The evaluator's configuration: the `eval:` section of an experiment config, or a YAML holding only that section.

The library keeps an experiment config's `eval:` section as an opaque mapping (`ExperimentConfig.eval`) and never
reads it; the evaluator owns its fields and checks them here, with the same one-line errors as the rest of the
config (naming the field, and the file or `--set` its value came from):

    cfg = load_config(path, overrides)                     # workbench.config: every other section
    evaluation = check_eval_section(cfg, path, overrides)  # this one: an EvalConfig, defaults filled in

`cfg.eval` itself stays as given (what `--dry-run` prints and the run's config.yaml records, so that the printed
config loads back to the same config); the evaluator fills in the defaults whenever it reads the section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from workbench.config import (
    DEFAULT_CONFIG,
    ExperimentConfig,
    read_yaml,
    resolve_path,
    validate_model,
    validation_message,
    value_origin,
)
from workbench.errors import ConfigError

__all__ = ["STUDY_CHECKS", "EvalConfig", "EvalDtype", "EvalTask", "StudyChecks", "check_eval_section", "eval_config",
           "load_eval_config"]


# lm-eval's automatic batch size: `auto`, or `auto:N` (the batch size detected again N times as the requests,
# longest first, get shorter)
AUTO_BATCH_SIZE = re.compile(r"auto(:[1-9][0-9]*)?")
EvalDtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EvalTask(_Section):
    task: str = Field(description="a BOSE task spec name (workbench_eval/tasks/) or any lm-eval task name")
    styles: list[str] | None = Field(None, description="prompt styles; default: every style of the task's kind")
    dataset_kwargs: dict[str, Any] | None = Field(None, description="override the data files of a stock task")
    overrides: dict[str, Any] = Field(default_factory=dict, description="other lm-eval task config fields")


class EvalConfig(_Section):
    """The BOSE evaluator: which tasks and prompt styles, how many items, and the styles' options."""

    tasks: list[EvalTask] = Field(
        default_factory=lambda: [EvalTask(task="factworld_mc"), EvalTask(task="factworld_qa")]
    )
    limit: int | None = Field(200, ge=1, description="items per task (the first N after a seeded shuffle)")
    batch_size: int | str = Field(
        32, description="requests per forward pass: an integer, or lm-eval's `auto` (on a GPU the largest batch that "
        "fits, from 64 down, halving on out-of-memory; on CPU 32) or `auto:N` (detected again N times as requests get "
        "shorter). Generative tasks detect at the model's full context length, which for long-context models can "
        "settle on 1: give an integer there")
    dtype: EvalDtype = Field(
        "auto", description="dtype checkpoints are evaluated in: `auto` is the dtype saved on a GPU and float32 on "
        "CPU; adapters are merged only in float32, else evaluated unmerged (base + adapter, as trained)")
    include_path: list[str] = Field(default_factory=list, description="more folders of task specs")
    style_options: dict[str, Any] = Field(default_factory=dict, description="workbench_eval.styles.StyleOptions fields")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples over items for tau intervals")
    early_fraction: float = Field(0.3, gt=0.0, le=1.0, description="share of checkpoints in the early window")
    on_save: bool = Field(False, description="evaluate each checkpoint as it is saved (rank 0)")
    on_save_limit: int = Field(50, ge=1, description="items per task when evaluating during training")
    on_save_timeout: int = Field(
        7200, ge=1, description="seconds the other ranks wait at a barrier for rank 0's evaluation on save "
        "(its own process group's timeout; training's collectives keep `training.ddp_timeout`)")
    experts: list[int] | Literal["all"] | None = Field(
        None, description="SMoE checkpoints only (models.moe): evaluate each cell at each of these numbers of "
        "active experts per token (`all`: 1, 2, 4, ..., E), recorded as style `<style>@k<K>`")

    @pydantic.field_validator("batch_size", mode="before")
    @classmethod
    def _check_batch_size(cls, value: Any) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, str) and AUTO_BATCH_SIZE.fullmatch(value):
            return value
        raise ValueError(f"batch_size must be an integer >= 1, `auto` or `auto:N` (N >= 1), got {value!r}")

    @pydantic.field_validator("experts")
    @classmethod
    def _check_experts(cls, value: list[int] | str | None) -> list[int] | str | None:
        if isinstance(value, list):
            if not value or any(isinstance(k, bool) or k < 1 for k in value):
                raise ValueError(f"experts must be `all` or a non-empty list of integers >= 1, got {value}")
            return sorted(set(value))
        return value


def eval_config(cfg: ExperimentConfig) -> EvalConfig:
    """The `eval:` section of `cfg`, validated; a one-line ConfigError naming the field (`check_eval_section`,
    as the config loads, also names the file or `--set` its value came from)."""
    try:
        return EvalConfig.model_validate(cfg.eval)
    except pydantic.ValidationError as err:
        raise ConfigError(validation_message(err, EvalConfig, ("eval",))[1]) from None


def check_eval_section(cfg: ExperimentConfig, path: str | Path | None = None,
                       overrides: list[str] | None = None) -> EvalConfig:
    """The `eval:` section of `cfg`, loaded by `load_config(path, overrides)`, validated. A bad field is a one-line
    ConfigError naming it and where its value came from (the file or the `--set` that gave it), as `load_config`
    reports every other section's: call this where the config is loaded, before any work."""
    try:
        evaluation = EvalConfig.model_validate(cfg.eval)
    except pydantic.ValidationError as err:
        field, message = validation_message(err, EvalConfig, ("eval",))
        origin = value_origin(resolve_path(path or DEFAULT_CONFIG), list(overrides or []), field)
        raise ConfigError(f"{origin}: {message}") from None
    return evaluation


class StudyChecks:
    """The evaluator's part of a study's planning checks (`workbench.study.metrics.EvaluatorChecks`):
    `load_study(path, evaluator=STUDY_CHECKS)` checks every run's `eval:` section and knows which evaluator columns
    a run writes as it trains."""

    def check_config(self, cfg: ExperimentConfig, path: str | Path, overrides: list[str]) -> None:
        check_eval_section(cfg, path, overrides)

    def logs_column(self, cfg: ExperimentConfig, key: str) -> bool:
        """`task.style.metric` is written during training when `eval.on_save` evaluates that task in that style."""
        task, style, _ = key.split(".")
        evaluation = eval_config(cfg)
        return evaluation.on_save and any(t.task == task and (t.styles is None or style in t.styles)
                                          for t in evaluation.tasks)


STUDY_CHECKS = StudyChecks()


def load_eval_config(path: str | Path) -> EvalConfig:
    """The `eval:` section of a YAML file (an experiment config or a file holding only that section)."""
    config_path = resolve_path(path)
    data = read_yaml(config_path)
    return validate_model(EvalConfig, data.get("eval", data), config_path, ("eval",))
