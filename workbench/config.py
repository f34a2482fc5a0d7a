"""The experiment config: one YAML file with sections `model`, `data`, `training`, `deepspeed`, `methods`.

`training` takes Hugging Face `TrainingArguments` fields by name and type; the other sections are
pydantic models. Every error is one line that names the field or file (see `workbench.errors`).

    cfg = load_config("configs/quickstart.yaml", overrides=["training.max_steps=10"])
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import ConfigError, did_you_mean

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/quickstart.yaml"

# TrainingArguments fields the workbench sets itself from other sections.
MANAGED_TRAINING_FIELDS = {
    "output_dir": "set 'name' and 'runs_dir' instead",
    "deepspeed": "set the top-level 'deepspeed' instead",
    "seed": "set the top-level 'seed' instead",
    "bf16": "set the top-level 'precision' instead",
    "fp16": "set the top-level 'precision' instead",
    "resume_from_checkpoint": "set the top-level 'resume_from_checkpoint' or pass --resume",
}


class YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are booleans; `no`, `off`, `yes`, `on` stay strings
    (so `eval_strategy: no` means the TrainingArguments value 'no', not False)."""


YamlLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


YamlLoader.add_implicit_resolver(  # YAML 1.2 floats such as 1e-3 (YAML 1.1 wants a dot: 1.0e-3)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


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


class DataConfig(_Section):
    source: str = Field(
        "synthetic:fact_world",
        description="'synthetic:fact_world', a hub dataset name, a .jsonl/.json/.parquet/.txt file or a folder of .txt",
    )
    text_column: str = "text"
    split: str = Field("train", description="split to read from a hub dataset")
    synthetic: dict[str, Any] = Field(default_factory=dict, description="FactWorldConfig fields")
    block_size: int = Field(128, ge=8, le=1_048_576, description="tokens per packed training example")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents held out")
    split_seed: int = Field(0, description="seed of the train/validation split (fixed across training seeds)")
    max_documents: int | None = Field(None, ge=1, description="use only the first N documents")
    num_proc: int | None = Field(None, ge=1, description="processes for datasets.map")
    cache_dir: str = Field(".cache/workbench", description="tokenizers and tokenised data are cached here")
    repetition: dict[str, Any] | None = Field(
        None, description="workbench.data.repetition.RepetitionConfig: budget_tokens, unique_tokens, mode, seed"
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


def dataclass_options(label: str, config_class: type, options: dict[str, Any]) -> dict[str, Any]:
    """Check `options` against a config dataclass (unknown keys, types, its own __post_init__ checks) and
    return them with defaults filled in; raise ValueError('[label.field] ...') naming the field."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in options:
        if key not in fields:
            raise ValueError(f"[{label}.{key}] unknown option{did_you_mean(key, fields)}")
    try:
        config = pydantic.TypeAdapter(config_class).validate_python(options)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # raised by the dataclass's own __post_init__ checks
            raise ValueError(f"[{label}] {message}") from None
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"[{label}.{field}] {message} (got {first.get('input')!r})") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"[{label}] {err}") from None
    return dataclasses.asdict(config)


class EvalTask(_Section):
    task: str = Field(description="a BOSE task spec name (evals/tasks/) or any lm-eval task name")
    styles: list[str] | None = Field(None, description="prompt styles; default: every style of the task's kind")
    dataset_kwargs: dict[str, Any] | None = Field(None, description="override the data files of a stock task")
    overrides: dict[str, Any] = Field(default_factory=dict, description="other lm-eval task config fields")


class EvalConfig(_Section):
    """The BOSE evaluator: which tasks and prompt styles, how many items, and the styles' options."""

    tasks: list[EvalTask] = Field(
        default_factory=lambda: [EvalTask(task="factworld_mc"), EvalTask(task="factworld_qa")]
    )
    limit: int | None = Field(200, ge=1, description="items per task (the first N after a seeded shuffle)")
    batch_size: int = Field(32, ge=1)
    include_path: list[str] = Field(default_factory=list, description="more folders of task specs")
    style_options: dict[str, Any] = Field(default_factory=dict, description="evals.styles.StyleOptions fields")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples over items for tau intervals")
    early_fraction: float = Field(0.3, gt=0.0, le=1.0, description="share of checkpoints in the early window")
    on_save: bool = Field(False, description="evaluate each checkpoint as it is saved (rank 0)")
    on_save_limit: int = Field(50, ge=1, description="items per task when evaluating during training")


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
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the BOSE evaluator (launch/eval.py)")
    save_at_steps: list[int] = Field(default_factory=list, description="extra checkpoint steps beyond save_steps")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @pydantic.field_validator("training")
    @classmethod
    def _check_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {key: _validate_training_field(key, v) for key, v in value.items()}

    @pydantic.field_validator("methods")
    @classmethod
    def _check_methods(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from workbench.methods import validate_method_config

        return {name: validate_method_config(name, options or {}) for name, options in value.items()}


@functools.cache
def _training_field_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


class _TrainingFieldError(ValueError):
    pass


def _validate_training_field(key: str, value: Any) -> Any:
    types = _training_field_types()
    if key in MANAGED_TRAINING_FIELDS:
        raise _TrainingFieldError(f"[{key}] is set by the workbench: {MANAGED_TRAINING_FIELDS[key]}")
    if key not in types:
        raise _TrainingFieldError(f"[{key}] is not a TrainingArguments field{did_you_mean(key, types)}")
    try:
        return pydantic.TypeAdapter(types[key]).validate_python(value)
    except pydantic.ValidationError as err:
        raise _TrainingFieldError(f"[{key}] {err.errors()[0]['msg']} (got {value!r})") from None


def resolve_path(path: str | Path) -> Path:
    """A path as given if it exists, else relative to the repository (for the bundled configs)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    bundled = REPO_ROOT / candidate
    return bundled if bundled.exists() else candidate


def _read_yaml(path: Path) -> dict[str, Any]:
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


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML (`1e-3`, `true`, `[a, b]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set '{override}': expected key=value, e.g. training.learning_rate=1e-3")
    try:
        value = parse_yaml(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _format_error(err: pydantic.ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")
    if msg.startswith("[") and "]" in msg:  # a nested field named by our own validators
        inner, _, msg = msg[1:].partition("] ")
        parts = inner.split(".")
        loc = (loc[:-1] if parts[0] == loc[-1] else loc) + parts  # "[noise.seed]" under data.noise
    field = ".".join(loc)
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        return f"{source}: unknown field '{field}'{did_you_mean(loc[-1], valid)}"
    got = first.get("input")
    shown = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) or got is None else f" (got {got!r})"
    if msg.endswith(")") and "(got " in msg:
        shown = ""
    return f"{source}: field '{field}': {msg}{shown}"


def _valid_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment config; raises ConfigError with a one-line message."""
    config_path = resolve_path(path or DEFAULT_CONFIG)
    data = _read_yaml(config_path)
    for override in overrides or []:
        apply_override(data, override)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(_format_error(err, str(config_path))) from None
    for field, value in (("deepspeed", cfg.deepspeed),):
        if value is not None and not resolve_path(value).is_file():
            raise ConfigError(f"{config_path}: field '{field}': file '{value}' not found")
    if cfg.model.name_or_path is None and cfg.model.preset is None:
        raise ConfigError(f"{config_path}: field 'model': give a 'preset' or a 'name_or_path'")
    if cfg.model.name_or_path is None:
        from workbench.models.presets import PRESETS, check_overrides

        if cfg.model.preset not in PRESETS:
            raise ConfigError(
                f"{config_path}: field 'model.preset': unknown preset '{cfg.model.preset}'"
                f"{did_you_mean(cfg.model.preset, PRESETS)}; valid: {', '.join(sorted(PRESETS))}"
            )
        check_overrides(cfg.model.preset, cfg.model.overrides)
    source = cfg.data.source
    if not source.startswith("synthetic:") and looks_local(source) and not Path(source).expanduser().exists():
        raise ConfigError(f"{config_path}: field 'data.source': file '{source}' not found")
    return cfg


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv")


def looks_local(source: str) -> bool:
    """A path rather than a hub name: starts like a path or ends like a data file."""
    return source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES)


def validate_model(model: type[BaseModel], data: Any, source: str | Path, prefix: tuple[str, ...] = ()):
    """`model.model_validate(data)`, or a ConfigError naming the source file and the first bad field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        field = ".".join([*prefix, *map(str, first["loc"])])
        raise ConfigError(f"{source}: field '{field}': {first['msg']}") from None


def override_string(key: str, value: Any) -> str:
    """`key=value` with the value written as YAML, the form `--set` takes."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_eval_config(path: str | Path) -> EvalConfig:
    """The `eval:` section of a YAML file (an experiment config or a file holding only that section)."""
    config_path = resolve_path(path)
    data = _read_yaml(config_path)
    return validate_model(EvalConfig, data.get("eval", data), config_path, ("eval",))


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from workbench.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
