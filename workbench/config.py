"""The experiment config: one YAML file with sections `model`, `data`, `training`, `deepspeed`, `methods`.

`training` takes Hugging Face `TrainingArguments` fields by name and type; the other sections are
pydantic models. Every error is one line that names the field or file (see `workbench.errors`).

    cfg = load_config("configs/quickstart.yaml", overrides=["training.max_steps=10"])
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from workbench.bundled import builtin_config
from workbench.deepspeed_json import LORAPLUS_UNDER_DEEPSPEED_OPTIMIZER, deepspeed_defines_optimizer
from workbench.errors import ConfigError, did_you_mean
from workbench.options import dataclass_options
from workbench.sources import hub_problem, looks_like_model_path, looks_local
from workbench.yaml_text import apply_override, parse_yaml

DEFAULT_CONFIG = "configs/quickstart.yaml"  # a built-in config (workbench/configs/, see workbench.bundled)

# TrainingArguments fields the workbench sets itself from other sections.
MANAGED_TRAINING_FIELDS = {
    "output_dir": "set 'name' and 'runs_dir' instead",
    "deepspeed": "set the top-level 'deepspeed' instead",
    "seed": "set the top-level 'seed' instead",
    "bf16": "set the top-level 'precision' instead",
    "fp16": "set the top-level 'precision' instead",
    "resume_from_checkpoint": "set the top-level 'resume_from_checkpoint' or pass --resume",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    preset: str | None = Field("pythia-tiny", description="a preset from workbench.models.PRESETS")
    name_or_path: str | None = Field(None, description="hub name or local folder; overrides 'preset'")
    tokenizer: str | None = Field(
        None, description="hub name or local folder; default: the checkpoint's own, else one trained on the data"
    )
    tokenizer_vocab_size: int = Field(2048, ge=64, le=1_000_000, description="vocabulary of a trained tokenizer")
    overrides: dict[str, Any] = Field(default_factory=dict, description="model config fields to override")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model (off unless asked)")
    lora: dict[str, Any] | None = Field(
        None, description="LoRA adapters via PEFT: peft.LoraConfig fields; {} = r 8, lora_alpha 16, lora_dropout 0.05, "
        "target_modules all-linear (workbench.models.lora)"
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: lora_B trains at this multiple of the learning rate (needs 'lora')"
    )

    @pydantic.field_validator("lora")
    @classmethod
    def _check_lora(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from workbench.models.lora import validate_lora_options

        return None if value is None else validate_lora_options(value)

    @pydantic.model_validator(mode="after")
    def _check_lora_needs(self) -> ModelConfig:
        if self.loraplus_lr_ratio is not None and self.lora is None:
            raise ValueError("[loraplus_lr_ratio] LoRA+ needs LoRA: set 'model.lora' too (e.g. 'lora: {}')")
        if self.lora is not None and self.name_or_path is None:
            raise ValueError("[lora] LoRA adapts a pretrained model: set 'model.name_or_path' (a preset's random "
                             "weights are not saved, so its adapter checkpoints could not be loaded)")
        return self


class DataConfig(_Section):
    source: str = Field(
        "synthetic:fact_world",
        description="'synthetic:fact_world' (text), 'synthetic:arithmetic' or 'synthetic:fact_qa' "
        "(fine-tuning), 'synthetic:fact_tf' or 'synthetic:fact_value' (classification), a hub dataset name, a "
        ".jsonl/.json/.parquet/.csv/.txt file, or a folder of .txt or of data files",
    )
    text_column: str = "text"
    split: str = Field("train", description="split to read from a hub dataset")
    synthetic: dict[str, Any] = Field(
        default_factory=dict,
        description="generator options: FactWorldConfig fields (fact_world, fact_qa), ArithmeticConfig "
        "fields (arithmetic)",
    )
    block_size: int = Field(
        128, ge=8, le=1_048_576, description="tokens per packed training example; fine-tuning: the max length"
    )
    format: Literal["auto", "text", "prompt_completion", "messages"] = Field(
        "auto",
        description="fine-tuning examples; auto: prompt_completion for the built-in QA generators and for "
        "sources with prompt and completion columns, messages for a messages column, text otherwise",
    )
    prompt_column: str = Field("prompt", description="fine-tuning: the column read as TRL's 'prompt'")
    completion_column: str = Field(
        "completion", description="fine-tuning: the column read as TRL's 'completion'"
    )
    messages_column: str = Field("messages", description="fine-tuning: the column read as TRL's 'messages'")
    label_column: str | None = Field(
        None, description="sequence classification: the column of labels (with text_column); setting it, or the "
        "generator synthetic:fact_tf or synthetic:fact_value (column label), makes the run a classifier (workbench.kinds.classification)"
    )
    packing: bool = Field(
        False, description="fine-tuning: pack examples into block_size rows, each attending only to itself"
    )
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out")
    split_seed: int = Field(0, description="seed of the train/validation split (fixed across training seeds)")
    max_documents: int | None = Field(None, ge=1, description="use only the first N documents")
    num_proc: int | None = Field(None, ge=1, description="processes for datasets.map")
    cache_dir: str = Field(".cache/workbench", description="tokenizers and tokenised data are cached here")
    repetition: dict[str, Any] | None = Field(
        None, description="workbench.data.repetition.RepetitionConfig: budget_tokens, unique_tokens, mode, seed, subset"
    )

    noise: dict[str, Any] | None = Field(
        None, description="workbench.data.noise.NoiseConfig: word_replace_prob, seed (training text only)"
    )
    objective: Literal["auto", "causal", "span_corruption"] = Field(
        "auto", description="auto: causal LM for decoder-only models, span corruption for encoder-decoder ones"
    )
    span_corruption: dict[str, Any] | None = Field(
        None, description="workbench.data.span_corruption.SpanCorruptionConfig: noise_density, mean_span_length, ..."
    )

    @pydantic.field_validator("noise", "repetition", "span_corruption")
    @classmethod
    def _check_options(cls, value: dict[str, Any] | None, info: pydantic.ValidationInfo) -> dict[str, Any] | None:
        from workbench.data.noise import NoiseConfig
        from workbench.data.repetition import RepetitionConfig
        from workbench.data.span_corruption import SpanCorruptionConfig

        config_class = {"noise": NoiseConfig, "repetition": RepetitionConfig,
                        "span_corruption": SpanCorruptionConfig}[info.field_name]
        return None if value is None else dataclass_options(info.field_name, config_class, value)


class ExperimentConfig(_Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.=\-/]+$", description="the run's folder under runs_dir")
    runs_dir: str = "runs"
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it; on CPU, bf16 only where measured faster than fp32"
    )
    deepspeed: str | None = Field("configs/deepspeed/zero2.json", description="DeepSpeed JSON; null: no DeepSpeed")
    resume_from_checkpoint: str | None = Field(None, description="'auto' (newest complete checkpoint) or a path")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: dict[str, Any] = Field(default_factory=dict, description="transformers.TrainingArguments fields")
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict, description="method name -> its config")
    eval: dict[str, Any] = Field(
        default_factory=dict, description="the BOSE evaluator's section (launch/eval.py): the library keeps it as "
        "given and writes it to the run's config.yaml; the evaluator validates it (workbench_eval.config)"
    )
    save_at_steps: list[int] = Field(default_factory=list, description="extra checkpoint steps beyond save_steps")

    @property
    def run_dir(self) -> Path:
        """The run's folder, absolute: a relative `runs_dir` is relative to the current directory."""
        return (Path(self.runs_dir).expanduser() / self.name).absolute()

    @pydantic.field_validator("training")
    @classmethod
    def _check_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {key: _validate_training_field(key, v) for key, v in value.items()}

    @pydantic.field_validator("methods")
    @classmethod
    def _check_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from workbench.methods import validate_method_config

        return {name: validate_method_config(name, options or {}) for name, options in value.items()}

    @pydantic.model_validator(mode="after")
    def _check_methods_fit_the_model(self) -> ExperimentConfig:
        from workbench.methods import method_class
        from workbench.methods.stack import check_compatible

        check_compatible(self.methods)  # two methods that cannot share a run: "[methods] methods 'a' and 'b' ..."
        for name, options in self.methods.items():
            method = method_class(name)
            method.check_lora(method.Config(**options), self.model.lora)
        return self


@functools.cache
def _training_field_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


class _TrainingFieldError(ValueError):
    pass


def _validate_training_field(key: str, value: Any) -> Any:
    """One `training` value checked against its TrainingArguments type; an int given for a float field
    (`warmup_steps: 30`, typed `float` so that it may also be a ratio) stays an int."""
    types = _training_field_types()
    if key in MANAGED_TRAINING_FIELDS:
        raise _TrainingFieldError(f"[{key}] is set by the workbench: {MANAGED_TRAINING_FIELDS[key]}")
    if key not in types:
        raise _TrainingFieldError(f"[{key}] is not a TrainingArguments field{did_you_mean(key, types)}")
    try:
        checked = pydantic.TypeAdapter(types[key]).validate_python(value)
    except pydantic.ValidationError as err:
        raise _TrainingFieldError(f"[{key}] {err.errors()[0]['msg']} (got {value!r})") from None
    if key == "report_to":
        _check_report_to(checked)
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(checked, float) and checked == value:
        return value
    return checked


# How to make a `report_to` integration available, where it is not `pip install <name>`.
REPORT_TO_INSTALL = {"azure_ml": "pip install azureml-core", "dagshub": "pip install dagshub mlflow",
                     "flyte": "pip install flytekit flytekitplugins-deck-standard",
                     "kubeflow": "set KUBEFLOW_TRAINER_SERVER_URL"}


def installed_integrations() -> set[str]:
    """The `report_to` integrations that can run in this environment."""
    from transformers.integrations import integration_utils as integrations

    found = set(integrations.get_available_reporting_integrations())
    if integrations.is_azureml_available():  # listed by transformers only without mlflow
        found.add("azure_ml")
    if integrations.is_flytekit_available() and integrations.is_flyte_deck_standard_available():
        found.add("flyte")
    return found


def _check_report_to(value: str | list[str] | None) -> None:
    """Each `report_to` name is 'all', 'none' or an integration of transformers that is installed."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    names = [value] if isinstance(value, str) else list(value or [])
    valid = ["all", "none", *INTEGRATION_TO_CALLBACK]
    for name in names:
        if name not in valid:
            raise _TrainingFieldError(
                f"[report_to] unknown integration '{name}'{did_you_mean(name, valid)}; valid: {', '.join(valid)}"
            )
    missing = [n for n in names if n not in ("all", "none") and n not in installed_integrations()]
    if missing:
        hint = REPORT_TO_INSTALL.get(missing[0], f"pip install {missing[0]}")
        raise _TrainingFieldError(f"[report_to] '{missing[0]}' is not installed ({hint})")


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else the built-in config that `configs/<rest>` names (`workbench.bundled`),
    else the path as given."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return builtin_config(candidate) or candidate


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; a ConfigError naming the file (and line) where it has none."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def validation_message(err: pydantic.ValidationError, model: type[BaseModel] | None = None,
                       prefix: tuple[str, ...] = ()) -> tuple[str, str]:
    """The first error of `err`, raised validating `model` (default `ExperimentConfig`) as the section at
    `prefix` of an experiment config (e.g. ("eval",)), as (dotted field, one-line message naming that field)."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")
    if msg.startswith("[") and "]" in msg:  # a nested field named by our own validators
        inner, _, msg = msg[1:].partition("] ")
        parts = inner.split(".")
        loc = (loc[:-1] if loc and parts[0] == loc[-1] else loc) + parts  # "[noise.seed]" under data.noise
    field = ".".join([*prefix, *loc])
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(model or ExperimentConfig, loc[:-1])
        return field, f"unknown field '{field}'{did_you_mean(loc[-1], valid)}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if msg.endswith(")") and "(got " in msg:
        shown = ""
    return field, f"field '{field}': {msg}{shown}"


def _valid_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def value_origin(config_path: str | Path, overrides: list[str], *fields: str) -> str:
    """Where the value of a dotted field came from: the last `--set` that wrote it, a field under it or a
    section holding it (`--set training.learning_rat=1`), else the config file."""
    for override in reversed(overrides):
        key = override.partition("=")[0]
        if any(key == f or key.startswith(f + ".") or f.startswith(key + ".") for f in fields):
            return f"--set {override}"
    return str(config_path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment config; raises ConfigError with a one-line message that
    names the field and where its value came from (the file or the `--set` that gave it).

    Nothing here measures, downloads or writes: it runs before any work, on every rank."""
    config_path = resolve_path(path or DEFAULT_CONFIG)
    data = read_yaml(config_path)
    overrides = list(overrides or [])
    for override in overrides:
        apply_override(data, override)

    def fail(message: str, *fields: str) -> ConfigError:
        return ConfigError(f"{value_origin(config_path, overrides, *fields)}: {message}")

    try:
        cfg = ExperimentConfig.model_validate(data)
    except pydantic.ValidationError as err:
        field, message = validation_message(err)
        raise fail(message, field) from None
    if cfg.deepspeed is not None and not resolve_path(cfg.deepspeed).is_file():
        raise fail(f"field 'deepspeed': file '{cfg.deepspeed}' not found", "deepspeed")
    if cfg.model.loraplus_lr_ratio is not None and cfg.deepspeed is not None \
            and deepspeed_defines_optimizer(resolve_path(cfg.deepspeed)):
        raise fail(LORAPLUS_UNDER_DEEPSPEED_OPTIMIZER, "model.loraplus_lr_ratio", "deepspeed")
    _check_model_choice(cfg.model, fail)
    _check_sources(cfg, fail)
    return cfg


def _check_model_choice(model: ModelConfig, fail: typing.Callable[..., ConfigError]) -> None:
    """Exactly one of `preset` and `name_or_path` (the default preset counts only when no path is given);
    a preset must exist and its overrides must be fields of its config class."""
    if model.name_or_path is not None and model.preset is not None and "preset" in model.model_fields_set:
        raise fail(f"field 'model': 'preset' ({model.preset}) and 'name_or_path' ({model.name_or_path}) are both "
                   "set; keep one (e.g. set model.preset to null to load name_or_path)",
                   "model.name_or_path", "model.preset")
    if model.name_or_path is not None:
        return
    if model.preset is None:
        raise fail("field 'model': give a 'preset' or a 'name_or_path'", "model.preset", "model.name_or_path")
    from workbench.models.presets import PRESETS, check_overrides

    if model.preset not in PRESETS:
        raise fail(f"field 'model.preset': unknown preset '{model.preset}'{did_you_mean(model.preset, PRESETS)}; "
                   f"valid: {', '.join(sorted(PRESETS))}", "model.preset")
    try:
        check_overrides(model.preset, model.overrides)
    except ConfigError as err:
        raise fail(str(err), "model.overrides") from None


def _check_sources(cfg: ExperimentConfig, fail: typing.Callable[..., ConfigError]) -> None:
    """Data, model and tokenizer sources that cannot load: a missing local file, or a hub name while hub
    access is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) with no cached copy, or with the hub unreachable."""
    source = cfg.data.source
    if not source.startswith("synthetic:") and not Path(source).expanduser().exists():
        if looks_local(source):
            raise fail(f"field 'data.source': file '{source}' not found", "data.source")
        problem = hub_problem(source, "dataset")
        if problem:
            raise fail(f"field 'data.source': '{source}' is not a local file or folder, and {problem}", "data.source")
    for field in ("name_or_path", "tokenizer"):
        name = getattr(cfg.model, field)
        if name is None or Path(name).expanduser().exists() or looks_like_model_path(name):
            continue  # absent, local, or a missing path (the model loader names it)
        runs = Path(cfg.runs_dir).expanduser()
        if Path(name).expanduser().parent in (runs, runs.absolute()):  # runs/<name>: a run not trained yet
            raise fail(f"field 'model.{field}': run '{name}' not found (train it first: a run's folder holds its "
                       "config.yaml and checkpoints)", f"model.{field}")
        problem = hub_problem(name, "model")
        if problem:
            raise fail(f"field 'model.{field}': '{name}' is not a local folder, and {problem}", f"model.{field}")


def validate_model(model: type[BaseModel], data: Any, source: str | Path, prefix: tuple[str, ...] = ()):
    """`model.model_validate(data)`, or a ConfigError naming the source file and the first bad field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        field = ".".join([*prefix, *map(str, first["loc"])])
        raise ConfigError(f"{source}: field '{field}': {first['msg']}") from None


def config_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML that `load_config` reads back to the same config."""
    data = cfg.model_dump(mode="json")
    if cfg.model.name_or_path is not None:
        data["model"]["preset"] = None  # unused with a name_or_path (and both set would be an error)
    return yaml.safe_dump(data, sort_keys=False)


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from workbench.io import atomic_write_text

    atomic_write_text(path, config_yaml(cfg))
