"""A study's references checked before any run starts: every axis, axis value and column that `compare`,
`plots`, `primary` and `same_as` name (`check_references`, called by `workbench.study.plan.load_study`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.errors import ConfigError, did_you_mean
from workbench.study.plan import CURVE_X, RUN_COLUMNS, DeltaSpec, StudyConfig, axis_values, collected, warn


def columns(study: StudyConfig) -> set[str]:
    """The numeric columns a run's row can have from `collect` and `compare: delta` (besides evaluator
    columns `task.style.metric`, which every row gets from the run's evaluation results)."""
    out: set[str] = set()
    for key, direction in collected(study.collect).items():
        if direction == "spread":
            out |= {key, f"var@{key}", f"osc@{key}", f"res@{key}"}
            out |= {f"noise@{key}", f"excess@{key}"} if study.noise is not None else set()
        elif direction == "first":
            out |= {key, f"first_{key}", f"first_step_{key}"}
        else:
            out |= {key} | ({f"best_{key}", f"best_step_{key}"} if direction != "last" else set())
    deltas = {spec.column(key) for spec in study.compare if isinstance(spec, DeltaSpec) for key in spec.keys}
    return out | deltas | set(RUN_COLUMNS)


def is_evaluator_column(key: str) -> bool:
    """`task.style.metric`: a score the BOSE evaluator writes for a checkpoint."""
    return len(key.split(".")) == 3 and all(key.split("."))


def check_references(study: StudyConfig, path: Path, on_warning: Callable[[str], None] = warn) -> None:
    """Every axis, axis value and column that `compare` and `plots` name exists (else a ConfigError naming
    the field); a `where` value no run has is a warning (a profile may drop it)."""

    def axis(field_name: str, name: str) -> None:
        if name not in study.axes:
            raise ConfigError(f"{path}: field '{field_name}': '{name}' is not an axis of the study"
                              f"{did_you_mean(name, study.axes)}; axes: {', '.join(study.axes) or '(none)'}")

    def column(field_name: str, name: str, known: set[str]) -> None:
        if name not in known and not is_evaluator_column(name):
            raise ConfigError(f"{path}: field '{field_name}': '{name}' is not a column of the table"
                              f"{did_you_mean(name, known)}; add it to 'collect' (columns: {', '.join(sorted(known))})")

    known = columns(study)
    for i, spec in enumerate(study.compare):
        where = f"compare[{i}]"
        if isinstance(spec, DeltaSpec):
            axis(f"{where}.axis", spec.axis)
            if str(spec.reference) not in axis_values(study, spec.axis):
                raise ConfigError(f"{path}: field '{where}.reference': {spec.reference!r} is not a value of axis "
                                  f"'{spec.axis}' (its values: {', '.join(axis_values(study, spec.axis))})")
            for key in spec.keys:
                column(f"{where}.keys", key, known)
            for key, other in spec.against.items():
                if key not in spec.keys:
                    raise ConfigError(f"{path}: field '{where}.against': '{key}' is not one of its keys")
                column(f"{where}.against", other, known)
        else:
            axis(f"{where}.group", spec.group)
            axis(f"{where}.x", spec.x)
            column(f"{where}.y", spec.y, known)
            for key in spec.cost if "cost" in spec.model_fields_set else []:
                column(f"{where}.cost", key, known)
    if study.primary is not None:
        column("primary", study.primary, known)
    if study.page is not None and study.profile is None:  # a profile never publishes
        marker = f"<!-- study {study.study} -->"
        page = Path(study.page)
        text = page.read_text() if page.is_file() else ""
        if marker not in text or f"<!-- /study {study.study} -->" not in text:
            on_warning(f"{path}: field 'page': '{page}' (from this directory) has no block '{marker}' ... "
                       f"'<!-- /study {study.study} -->': the claims will not be written into it")
    for i, claim in enumerate(study.claims):
        where = f"claims[{i}]"
        axis(f"{where}.axis", claim.axis)
        for part in ("arm", "reference"):
            if str(getattr(claim, part)) not in axis_values(study, claim.axis):
                raise ConfigError(f"{path}: field '{where}.{part}': {getattr(claim, part)!r} is not a value of axis "
                                  f"'{claim.axis}' (its values: {', '.join(axis_values(study, claim.axis))})")
        column(f"{where}.metric", claim.metric, known)
        for name, value in claim.where.items():
            axis(f"{where}.where", name)
            if str(value) not in axis_values(study, name):
                raise ConfigError(f"{path}: field '{where}.where': {value!r} is not a value of axis '{name}'")
        if claim.paper.relative_to is not None:
            column(f"{where}.paper.relative_to", claim.paper.relative_to, known)
        if claim.at_best is not None:
            axis(f"{where}.at_best.axis", claim.at_best.axis)
            column(f"{where}.at_best.by", claim.at_best.by, known)
        fixed = {claim.axis, *claim.where, *([claim.at_best.axis] if claim.at_best else [])}
        loose = [a for a in study.axes if a not in fixed and len(axis_values(study, a)) > 1]
        if loose:
            raise ConfigError(f"{path}: field '{where}.where': axis '{loose[0]}' has several values; fix it to one "
                              "(a claim pairs one run per seed on each side)")
    for i, rule in enumerate(study.same_as):
        for part, labels in (("where", rule.where), ("use", rule.use)):
            for name, value in labels.items():
                axis(f"same_as[{i}].{part}", name)
                if str(value) not in axis_values(study, name):
                    on_warning(f"{path}: field 'same_as[{i}].{part}': no run has {name} = {value!r}: the rule "
                               "links no runs")
    for i, plot in enumerate(study.plots):
        where = f"plots[{i}]"
        if plot.kind == "final":
            if plot.x not in RUN_COLUMNS:
                axis(f"{where}.x", plot.x)
            column(f"{where}.y", plot.y, known)
        if plot.kind == "curve" and plot.x not in CURVE_X:
            raise ConfigError(f"{path}: field '{where}.x': a curve's x is one of {', '.join(CURVE_X)}, got '{plot.x}'")
        for name, value in plot.reference.items():
            axis(f"{where}.reference", name)
            if str(value) not in axis_values(study, name):
                raise ConfigError(f"{path}: field '{where}.reference': {value!r} is not a value of axis '{name}'")
        if plot.kind == "experts" and not is_evaluator_column(plot.y):
            raise ConfigError(f"{path}: field '{where}.y': an `experts` plot takes an evaluator column "
                              f"task.style.metric (its per-k columns are task.style@k<K>.metric), got '{plot.y}'")
        if plot.group is not None:
            axis(f"{where}.group", plot.group)
        for name, value in plot.where.items():
            axis(f"{where}.where", name)
            if str(value) not in axis_values(study, name):
                on_warning(f"{path}: field '{where}.where': no run has {name} = {value!r}: the plot will be empty")
