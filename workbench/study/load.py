"""Reading a study YAML and checking everything it refers to before any run starts (`load_study`): every run's
config, the collected metrics (against what a run logs, `workbench.study.metrics`), and the axes, values and
columns that `compare`, `plots`, `primary` and `same_as` name (`workbench.study.checks`).

Its own module above `plan` (the study's schema and grid), `checks` and `metrics`, which it calls and which do
not import it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.config import ExperimentConfig, load_config, resolve_path, validate_model
from workbench.errors import ConfigError
from workbench.study.checks import check_references
from workbench.study.metrics import EvaluatorChecks, check_metrics
from workbench.study.plan import MANAGED, StudyConfig, check_pretrain, plan, warn
from workbench.yaml_text import override_string, parse_yaml


def load_study(path: str | Path, profile: str | None = None, on_warning: Callable[[str], None] = warn,
               evaluator: EvaluatorChecks | None = None) -> StudyConfig:
    """Read and check a study YAML (as profile `profile`, if given). Every run's config is validated here,
    so a bad base config, override or variant fails before any run starts; so do a collected metric that no
    run can log and a `compare` or `plots` entry that names no axis, axis value or column. A collected name
    that only some runtime or method may log is passed to `on_warning`.

    `evaluator` (the study command passes `workbench_eval.config.STUDY_CHECKS`): the evaluator's checks of the
    `eval:` section it owns in every run's config, and its answer to which evaluator columns a run writes as it
    trains; without it, that section is not checked here and an evaluator column is a warning."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' not found")
    study = validate_model(StudyConfig, parse_yaml(path.read_text()) or {}, path)
    check_pretrain(study, path)
    if profile is not None:
        study = study.with_profile(profile)
        check_pretrain(study, path)
    if study.combine == "zip" and len({len(v) for v in study.axes.values()}) > 1:
        raise ConfigError(f"{path}: field 'axes': zipped axes need the same number of values")
    configs: dict[str, ExperimentConfig] = {}
    arms: dict[str, ExperimentConfig] = {}  # the distinct configs of the arms (the runs that are collected)
    for run in plan(study):
        overrides = [override_string(k, v) for k, v in run.settings.items() if k not in MANAGED]
        key = str([run.config, overrides])
        if key not in configs:
            try:
                configs[key] = load_config(run.config, overrides)
                if evaluator is not None:
                    evaluator.check_config(configs[key], run.config, overrides)
            except ConfigError as err:
                raise ConfigError(f"{path}: run '{run.name}': {err}") from None
        if run.stage == "arm":
            arms[key] = configs[key]
    check_metrics(study, list(arms.values()), path, on_warning, evaluator)
    check_references(study, path, on_warning)
    return study
