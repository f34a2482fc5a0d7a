"""A study's YAML (`StudyConfig`) and its plan: the grid of runs (the arms) and the optional pretrain run.

A study YAML:

    study: repetition-quick                      # runs go to <runs_dir>/<study>/<run name>/
    base: configs/quickstart.yaml                # an experiment config: every arm starts from it
    set: {training.max_steps: 64}                # overrides shared by every arm
    axes:                                        # key -> values; the grid is their product (or zip)
      data.repetition.unique_tokens: [65536, 16384]
      model.preset: [pythia-tiny, pythia-small]
      regulariser:                               # a named-variant axis: name -> the overrides it sets
        none: {}
        dropout-0.1: {methods.dropout_schedule.rate: 0.1}
    combine: product                             # product | zip
    seeds: [0, 1, 2]
    launcher: {kind: python}                     # python | deepspeed (with num_gpus)
    resources: {gpus_per_run: 1, cpus_per_run: 8, mem_gb: 64, time_min: 120, partition: gpu}  # per run
    collect: [eval_loss, eval_token_accuracy:max, train_runtime:last]  # final value, best value + its step
    pretrain: {config: configs/quickstart.yaml, set: {training.max_steps: 100}}  # optional first stage
    # pretrain: {..., as: methods.sinkd.teacher}  # the arms get the folder as this key instead (a teacher)
    # pretrain: {..., per: regulariser, set_per_value: {dropout-0.1: {...}}}  # one pretrain run per axis value
    # pretrain: {..., seeded: true}             # and one per seed (the seed varies the whole pipeline)
    profiles: {quick: {seeds: [0]}}              # smaller/larger grids: --quick, --scale, --profile NAME
    same_as: [{where: {U: 1024, schedule: control}, use: {schedule: fixed}}]  # arms that repeat another's
                                                 # training: trained once, collected under both labels

Each run goes through `launch/train.py` (so `deepspeed` with several ranks works the same), with its axis
values as `--set` overrides and `--resume`, so a killed run continues from its checkpoint. With `pretrain`,
that run is trained first, once, into `<runs_dir>/<study>/pretrain/`, and every arm starts from it
(`model.name_or_path=<that folder>`, `model.preset=null`), or, with `pretrain.as: <key>`, gets the folder as
that one override instead and keeps its own model (e.g. `methods.sinkd.teacher`: a teacher trained once).
With `pretrain.per: <axis>` there is one pretrain run per value of that axis, `pretrain_<axis>=<value>`
(`pretrain.set`, then `pretrain.set_per_value[<value>]`), and each arm starts from the one of its value.
With `pretrain.seeded: true` there is also one pretrain run per seed (`..._seed=<s>`, trained with that seed), and
each arm starts from the one of its own seed, so the seed spread covers both stages.

Everything a study refers to is checked before any run starts, by `workbench.study.load.load_study`: every
run's config, the collected metrics (against what a run logs, `workbench.study.metrics`), and the axes and
reference values that `compare` and `plots` name (`workbench.study.checks`).
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from workbench.errors import ConfigError, did_you_mean
from workbench.study.claims import ClaimSpec
from workbench.study.selection import NoiseSpec, SelectSpec
from workbench.yaml_text import override_string

DIRECTIONS = ("min", "max", "last", "first", "spread")  # the best value of a collected key (`last`: none;
# `first`: its first logged value, `first_<key>`, e.g. an update's norm early in training; `spread`: its
# variation over checkpoints, `var@key` and `osc@key`, see `workbench.study.collect.spread`)
PRETRAIN = "pretrain"  # the pretrain run's name and folder under <runs_dir>/<study>/ (with `per`: its prefix)
START_KEY = "model.name_or_path"  # where the arms get the pretrain folder unless `pretrain.as` names another key
MANAGED = ("seed", "name", "runs_dir")  # overrides the study sets itself on every run


def collected(items: list[str]) -> dict[str, str]:
    """`collect` entries (`key`, `key:min`, `key:max`, `key:last`, `key:spread`) -> {key: what to report}."""
    return {key: direction or "min" for key, _, direction in (item.partition(":") for item in items)}


def check_collect_items(items: list[str]) -> list[str]:
    """Raise ValueError for a `collect` entry whose direction is not min, max or last."""
    for item in items:
        if item.partition(":")[2] not in ("", *DIRECTIONS):
            raise ValueError(f"collect '{item}': write key, key:min, key:max, key:last or key:spread")
    return items


def warn(message: str) -> None:
    """Print a planning or collection warning, visibly, on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Launcher(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["python", "deepspeed"] = "python"
    num_gpus: int = Field(1, ge=1, description="ranks per run under deepspeed (GPUs, or CPU processes)")


class Resources(BaseModel):
    """What each run of the study is given: GPUs, CPU cores, memory and time (what a Slurm job of the run asks
    for, `workbench.study.submitit`; locally, each of the `--parallel` slots gets its own `gpus_per_run` GPUs
    and, where set, `cpus_per_run` threads). The command line's --gpus-per-run etc. override them."""

    model_config = ConfigDict(extra="forbid")
    # default: the launcher's num_gpus under deepspeed, else 1 (a one-process run uses one GPU); 0 for CPU runs
    gpus_per_run: int | None = Field(None, ge=0)
    cpus_per_run: int | None = Field(None, ge=1)  # default: Slurm's default; locally the cores // --parallel
    mem_gb: float | None = Field(None, gt=0)  # default: Slurm's default
    time_min: int = Field(240, ge=1)  # a Slurm job's time limit
    partition: str | None = None  # the Slurm partition (default: the cluster's)


# Columns every run's row gets where they apply (`workbench.study.collect.run_columns`), usable as a `final`
# plot's x: the model's parameter count, and for a repetition run its epochs D/U and unique tokens per parameter
RUN_COLUMNS = ("parameters", "epochs", "unique_tokens_per_parameter")
CURVE_X = ("step", "epochs")  # a curve against the training step, or (repetition runs) epochs of the U tokens


class PlotSpec(BaseModel):
    """A PNG of the study: `final` = a collected column against an axis (mean ± std over seeds; a paired
    `delta_` column: mean with its 95% t-interval, against a zero line), one line per value of `group`;
    `curve` = a metrics.jsonl key or an evaluator column `task.style.metric` against step, one line per arm
    (mean over seeds, a band of ± 1 std when there are several); `experts` = an evaluator column of SMoE runs
    evaluated at several numbers of active experts (`task.style.metric`, read from the columns
    `task.style@k<K>.metric`) against k, one line per arm (mean ± std over seeds), an arm evaluated without
    experts (a dense model) as a horizontal line at its `task.style.metric`."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["final", "curve", "experts"] = "final"
    x: str = "step"  # `final`: an axis or a RUN_COLUMNS column; `curve`: one of CURVE_X
    y: str  # a collected column (`final`), or a metrics.jsonl key or evaluator column (`curve`)
    group: str | None = None  # an axis: one line per value
    label: str | None = None  # the y axis's label, in the reader's units (default: the column's name)
    xlabel: str | None = None  # the x axis's label (default: the axis's name, or the training step / k)
    logx: bool = False
    logy: bool = False  # e.g. a loss where one arm diverges
    where: dict[str, Any] = Field(default_factory=dict)  # only the runs with these axis values
    # `curve`: the runs with these axis values drawn as a horizontal line at their final value (mean over seeds,
    # band ± 1 std) instead of a curve, e.g. the single-epoch reference of a repetition study
    reference: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None  # file name (default from y and x)


class DeltaSpec(BaseModel):
    """Per run, `delta_<key>` = its final value minus that of the run with `axis` = `reference` and the same
    other axis values and seed (a paired difference, then averaged over seeds like every column)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["delta"] = "delta"
    axis: str
    reference: Any
    keys: list[str]
    # a key -> the reference run's column it is paired with (default: the same key), e.g. an SMoE arm's
    # `task.zero_shot@k8.exact_match` against the dense reference's `task.zero_shot.exact_match`
    against: dict[str, str] = Field(default_factory=dict)
    # the columns' prefix: `<name>_<key>`; a second comparison of the same keys needs its own ("delta_vs_control")
    name: str = Field("delta", pattern=r"^delta(_[A-Za-z0-9]+)*$")

    def column(self, key: str) -> str:
        return f"{self.name}_{key}"


class AgreementSpec(BaseModel):
    """Do the groups of `group` agree on the best value of axis `x` for `y`? Best x per group (mean over
    seeds, and per seed), Kendall's tau between the groups' y-vs-x curves, and each group's cost."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["agreement"] = "agreement"
    group: str
    x: str
    y: str
    cost: list[str] = Field(default_factory=lambda: ["train_runtime", "total_flos"])
    # which y is best: `max`/`min`, or `auto`: max where `collect` asks `y:max`, else min (losses); give `max`
    # for an evaluator column that is higher-better (accuracy, exact_match)
    best: Literal["auto", "max", "min"] = "auto"


class PretrainSpec(BaseModel):
    """The first stage of a two-stage study: one run, trained before the arms (resumably, like any run),
    into `<runs_dir>/<study>/pretrain/`; every arm starts from it (`model.name_or_path=<that folder>`).
    With `per: <axis>`, one such run per value of that axis (`pretrain_<axis>=<value>/`), each with
    `set_per_value[<value>]` over `set`; an arm starts from the one of its value. With `seeded`, one per seed
    as well (`..._seed=<s>`, trained with that seed); an arm starts from the one of its seed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    config: str | None = None  # an experiment config; default: the study's `base`
    set: dict[str, Any] = Field(default_factory=dict)  # its overrides (the study's `set` is the arms')
    # the key under which every arm gets the pretrain folder: model.name_or_path (with model.preset null: the arms
    # start from it), or any other dotted config key, e.g. methods.sinkd.teacher (the arms keep their own model)
    as_key: str = Field(START_KEY, alias="as", pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+$")
    per: str | None = None  # an axis: one pretrain run per value of it (default: one for every arm)
    set_per_value: dict[Any, dict[str, Any]] = Field(default_factory=dict)  # a value of `per` -> its run's overrides
    seeded: bool = False  # one pretrain run per seed as well, with that seed; an arm starts from its seed's

    @pydantic.field_validator("set")
    @classmethod
    def _check_set(cls, value: dict[str, Any]) -> dict[str, Any]:
        managed = [key for key in value if key in ("name", "runs_dir")]
        if managed:
            raise ValueError(f"'{managed[0]}' is set by the study (the pretrain run is <runs_dir>/<study>/pretrain)")
        return value

    @pydantic.field_validator("set_per_value")
    @classmethod
    def _check_set_per_value(cls, value: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
        for overrides in value.values():
            cls._check_set(overrides)
        return value


class SameRunSpec(BaseModel):
    """Arms whose training is exactly another arm's (e.g. the single-epoch control at U = D is the fixed-budget
    run at U = D): the arms with the axis labels `where` are not trained but read from the arm with the labels
    `use` instead (their other labels and seed the same), so each is collected under its own labels. Where a
    profile's grid lacks that arm, they are trained as usual."""

    model_config = ConfigDict(extra="forbid")
    where: dict[str, Any]
    use: dict[str, Any]


class StudyProfile(BaseModel):
    """A smaller or larger version of the study (`--quick`, `--scale`): its own seeds, axis values and
    overrides; its runs go to `<study>-<profile>` so they never mix with the default grid's."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    seeds: list[int] | None = None
    set: dict[str, Any] = Field(default_factory=dict)  # merged over the study's `set`
    axes: dict[str, list[Any] | dict[str, dict[str, Any]]] = Field(default_factory=dict)  # replaces these axes
    pretrain: PretrainSpec | None = None  # its `config` replaces, its `set` is merged over, the study's
    resources: dict[str, Any] = Field(default_factory=dict)  # merged over the study's `resources`
    select: dict[str, Any] = Field(default_factory=dict)  # merged over the study's `select`
    noise: dict[str, Any] = Field(default_factory=dict)  # merged over the study's `noise`
    spread_from: int | None = Field(None, ge=0)  # replaces the study's


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any] | dict[str, dict[str, Any]]] = Field(default_factory=dict)
    combine: Literal["product", "zip"] = "product"
    seeds: list[int] = Field(default_factory=lambda: [0])
    runs_dir: str = "runs"
    launcher: Launcher = Field(default_factory=Launcher)
    resources: Resources = Field(default_factory=Resources)
    collect: list[str] = Field(default_factory=lambda: ["eval_loss", "loss"])
    primary: str | None = None  # the study's primary metric (a collected column): report.md leads with it
    plots: list[PlotSpec] = Field(default_factory=list)
    compare: list[DeltaSpec | AgreementSpec] = Field(default_factory=list)
    pretrain: PretrainSpec | None = None
    same_as: list[SameRunSpec] = Field(default_factory=list)
    # config fields every arm sets to its own seed (e.g. data.synthetic.seed: its own training and test items)
    per_seed: list[str] = Field(default_factory=list)
    select: SelectSpec | None = None  # checkpoint choice by a task metric, test set scored there only
    noise: NoiseSpec | None = None  # one checkpoint re-scored with other sampling seeds: noise@, excess@ columns
    spread_from: int | None = Field(None, ge=0)  # `key:spread` columns count the checkpoints from this step on
    claims: list[ClaimSpec] = Field(default_factory=list)  # the paper's claims, each with its verdict
    # where the default grid's report, claims.json and plots are copied once every run is done (e.g. docs/results/x)
    publish: str | None = None
    page: str | None = None  # a page whose `<!-- study NAME -->` block gets the claims table when published
    profiles: dict[str, StudyProfile] = Field(default_factory=dict)
    profile: str | None = None  # the profile this config was made from (set by `with_profile`)

    @pydantic.field_validator("collect")
    @classmethod
    def _check_collect(cls, value: list[str]) -> list[str]:
        return check_collect_items(value)

    @property
    def folder(self) -> Path:
        """`<runs_dir>/<study>`: the study's runs, tables and report."""
        return Path(self.runs_dir) / self.study

    def with_profile(self, name: str) -> StudyConfig:
        """This study as its profile `name` says (runs under `<study>-<name>`)."""
        if name not in self.profiles:
            raise ConfigError(f"study '{self.study}' has no profile '{name}'; it has: "
                              f"{', '.join(self.profiles) or '(none)'}")
        profile = self.profiles[name]
        unknown = [axis for axis in profile.axes if axis not in self.axes]
        if unknown:
            raise ConfigError(f"profile '{name}': axis '{unknown[0]}' is not an axis of the study")
        pretrain = self.pretrain
        if profile.pretrain is not None:
            if pretrain is None:
                raise ConfigError(f"profile '{name}': field 'pretrain': the study has no pretrain run to change")
            as_key = profile.pretrain.as_key if "as_key" in profile.pretrain.model_fields_set else pretrain.as_key
            if profile.pretrain.per not in (None, pretrain.per):
                raise ConfigError(f"profile '{name}': field 'pretrain.per': a profile keeps the study's pretrain "
                                  f"axis ({pretrain.per or 'none: one pretrain run'})")
            # the study's per-value overrides for the values the profile keeps, each updated by the profile's
            kept = set(axis_values(self, pretrain.per, profile.axes)) if pretrain.per in self.axes else set()
            per_value = {str(value): dict(overrides) for value, overrides in pretrain.set_per_value.items()
                         if str(value) in kept}
            for value, overrides in profile.pretrain.set_per_value.items():
                per_value[str(value)] = {**per_value.get(str(value), {}), **overrides}
            seeded = profile.pretrain.seeded if "seeded" in profile.pretrain.model_fields_set else pretrain.seeded
            pretrain = PretrainSpec(config=profile.pretrain.config or pretrain.config,
                                    set={**pretrain.set, **profile.pretrain.set}, as_key=as_key,
                                    per=pretrain.per, set_per_value=per_value, seeded=seeded)
        sections = {}
        for field_name, model in (("select", SelectSpec), ("noise", NoiseSpec)):
            section, changes = getattr(self, field_name), getattr(profile, field_name)
            if changes and section is None:
                raise ConfigError(f"profile '{name}': field '{field_name}': the study has no `{field_name}` to change")
            sections[field_name] = validate_section(model, {**section.model_dump(), **changes},
                                                    f"profile '{name}': field '{field_name}") if changes else section
        if profile.spread_from is not None:
            sections["spread_from"] = profile.spread_from
        axes = {**self.axes, **profile.axes}

        def in_grid(claim: ClaimSpec) -> bool:  # a profile keeps the claims its grid can test
            wanted = [(claim.axis, claim.arm), (claim.axis, claim.reference), *claim.where.items()]
            return all(a in axes and str(v) in axis_values(self, a, axes) for a, v in wanted)

        def compared(spec: DeltaSpec | AgreementSpec) -> bool:  # and the deltas whose reference it runs
            return not isinstance(spec, DeltaSpec) or str(spec.reference) in axis_values(self, spec.axis, axes)

        return self.model_copy(update={
            "claims": [c for c in self.claims if in_grid(c)], "compare": [c for c in self.compare if compared(c)],
            **sections, "study": f"{self.study}-{name}", "profile": name, "seeds": profile.seeds or self.seeds,
            "set": {**self.set, **profile.set}, "axes": {**self.axes, **profile.axes},
            "description": profile.description or self.description, "pretrain": pretrain,
            "resources": self.with_resources(profile.resources, f"profile '{name}': field 'resources").resources})

    def with_resources(self, changes: dict[str, Any], where: str = "field 'resources") -> StudyConfig:
        """This study with `changes` to its `resources` (a profile's, the command line's), checked; a ConfigError
        names the field (`<where>.<field>'`)."""
        if not changes:
            return self
        resources = validate_section(Resources, {**self.resources.model_dump(exclude_unset=True), **changes}, where)
        return self.model_copy(update={"resources": resources})

    def gpus_per_run(self) -> int:
        """The GPUs each run uses: `resources.gpus_per_run`, by default the launcher's num_gpus under deepspeed
        and 1 for a one-process run. A ConfigError where the two disagree or a one-process run asks for several
        (the Trainer would fall back to torch's DataParallel over them)."""
        asked = self.resources.gpus_per_run
        ranks = self.launcher.num_gpus if self.launcher.kind == "deepspeed" else 1
        if asked is None:
            return ranks
        if asked > 1 and self.launcher.kind != "deepspeed":
            raise ConfigError(f"field 'resources.gpus_per_run': {asked} GPUs for a one-process run (launcher "
                              "python); use launcher {kind: deepspeed, num_gpus: N} for several GPUs per run")
        if self.launcher.kind == "deepspeed" and asked not in (0, ranks):
            raise ConfigError(f"field 'resources.gpus_per_run': {asked}, but launcher.num_gpus starts {ranks} "
                              "ranks per run; set them alike")
        return asked


@dataclass(frozen=True)
class RunSpec:
    """One run: its name, axis values (a variant axis gives its variant's name), seed (None: its config's
    own), folder, the config it starts from and every `--set` override it adds (the study's `set`, what its
    axis values stand for, and for an arm of a two-stage study the pretrain folder). `stage` is `arm` (a run
    of the grid), `pretrain`, or `hand` (a run launched by hand, collected with `--collect`). An arm that
    repeats another's training (the study's `same_as`) names that arm in `same_as` and has its folder."""

    name: str
    values: dict[str, Any]
    seed: int | None
    run_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    config: str = ""
    stage: Literal["arm", "pretrain", "hand"] = "arm"
    same_as: str | None = None

    def overrides(self) -> list[str]:
        """The `--set` overrides `launch/train.py` gets: the settings, then seed, name and runs_dir."""
        managed = {"seed": self.seed} if self.seed is not None else {}
        pairs = {**self.settings, **managed, "name": self.name, "runs_dir": str(self.run_dir.parent)}
        return [override_string(key, value) for key, value in pairs.items()]


def validate_section(model: type[BaseModel], values: dict[str, Any], where: str) -> Any:
    """`model` from `values`, or a ConfigError naming the field (`<where>.<field>'`)."""
    try:
        return model(**values)
    except pydantic.ValidationError as err:
        problem = err.errors()[0]
        field = ".".join(str(part) for part in problem["loc"])
        raise ConfigError(f"{where}.{field}': {problem['msg']}") from None


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", str(value)).strip("-")


def _labels(study: StudyConfig, axis: str) -> list[Any]:
    """An axis's values as the arms' `values` hold them (a variant axis: its variant names)."""
    values = study.axes[axis]
    return list(values.keys() if isinstance(values, dict) else values)


def pretrain_runs(study: StudyConfig) -> list[RunSpec]:
    """The study's pretrain runs: none for a one-stage study, `<runs_dir>/<study>/pretrain`, or with
    `pretrain.per: <axis>` one per value of that axis, `pretrain_<axis>=<value>` (named like the arms); with
    `pretrain.seeded` each of these once per seed, `..._seed=<s>` (`pretrain_seed=<s>` without `per`)."""
    spec = study.pretrain
    if spec is None:
        return []
    config = spec.config or study.base
    per_value = {str(value): overrides for value, overrides in spec.set_per_value.items()}
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = [(PRETRAIN, {}, dict(spec.set))]
    if spec.per is not None:
        variants = [(f"{PRETRAIN}_{spec.per.rsplit('.', 1)[-1]}={_slug(label)}", {spec.per: label},
                     {**spec.set, **per_value.get(str(label), {})}) for label in _labels(study, spec.per)]
    if not spec.seeded:
        return [RunSpec(name, values, None, study.folder / name, settings, config, "pretrain")
                for name, values, settings in variants]
    return [RunSpec(f"{name}_seed={seed}", values, seed, study.folder / f"{name}_seed={seed}", settings, config,
                    "pretrain") for name, values, settings in variants for seed in study.seeds]


def pretrain_for(study: StudyConfig, values: dict[str, Any], seed: int | None = None) -> RunSpec | None:
    """The pretrain run an arm with these axis values (and, for a `seeded` pretrain, this seed) starts from
    (None for a one-stage study)."""
    spec = study.pretrain
    if spec is None:
        return None
    if spec.seeded and seed is None:
        raise ValueError("a seeded pretrain stage needs the arm's seed")
    return next(r for r in pretrain_runs(study)
                if (spec.per is None or str(r.values[spec.per]) == str(values[spec.per]))
                and (not spec.seeded or r.seed == seed))


def check_pretrain(study: StudyConfig, path: str | Path) -> None:
    """`pretrain.per` names an axis and `pretrain.set_per_value` only its values (else a ConfigError)."""
    spec = study.pretrain
    if spec is None:
        return
    where = f"{path}: " + (f"profile '{study.profile}': " if study.profile else "")
    if spec.per is None:
        if spec.set_per_value:
            raise ConfigError(f"{where}field 'pretrain.set_per_value': needs 'pretrain.per' (the axis it is keyed by)")
        return
    if spec.per not in study.axes:
        raise ConfigError(f"{where}field 'pretrain.per': '{spec.per}' is not an axis of the study"
                          f"{did_you_mean(spec.per, study.axes)}; axes: {', '.join(study.axes) or '(none)'}")
    known = axis_values(study, spec.per)
    for value in spec.set_per_value:
        if str(value) not in known:
            raise ConfigError(f"{where}field 'pretrain.set_per_value': {value!r} is not a value of axis "
                              f"'{spec.per}' (its values: {', '.join(known)})")


def grid(study: StudyConfig) -> list[RunSpec]:
    """Every arm of the study, in a fixed order, named from its axis values and seed."""
    keys = list(study.axes)
    choices = [[(name, dict(overrides)) for name, overrides in values.items()] if isinstance(values, dict)
               else [(value, {axis: value}) for value in values] for axis, values in study.axes.items()]
    combos = zip(*choices, strict=True) if study.combine == "zip" else itertools.product(*choices)
    runs = []
    for combo in combos:
        labels = {axis: label for axis, (label, _) in zip(keys, combo, strict=True)}
        settings = {**study.set, **{k: v for _, overrides in combo for k, v in overrides.items()}}
        for seed in study.seeds:
            own = {key: seed for key in study.per_seed}
            # an arm loads its pretrain run (every run trains in the current directory, so a relative runs_dir
            # is there), as its model or under the key `pretrain.as` names
            pretrain, start = pretrain_for(study, labels, seed), {}
            if pretrain is not None:
                folder = str(Path.cwd() / pretrain.run_dir)
                key = study.pretrain.as_key
                start = {"model.preset": None, START_KEY: folder} if key == START_KEY else {key: folder}
            parts = [f"{k.rsplit('.', 1)[-1]}={_slug(v)}" for k, v in labels.items()] + [f"seed={seed}"]
            name = "_".join(parts)
            runs.append(RunSpec(name, labels, seed, study.folder / name, {**settings, **own, **start}, study.base))
    return _link_same_runs(study, runs)


def _link_same_runs(study: StudyConfig, runs: list[RunSpec]) -> list[RunSpec]:
    """`runs` with each arm that a `same_as` rule matches pointed at the arm it repeats (its folder, `same_as`)."""

    def labelled(run: RunSpec, wanted: dict[str, Any]) -> bool:
        return all(_slug(run.values.get(axis)) == _slug(value) for axis, value in wanted.items())

    linked = []
    for run in runs:
        rule = next((r for r in study.same_as if labelled(run, r.where)), None)
        wanted = {**run.values, **rule.use} if rule is not None else None
        target = next((r for r in runs if wanted is not None and r.seed == run.seed and labelled(r, wanted)
                       and not any(labelled(r, other.where) for other in study.same_as)), None)
        linked.append(run if target is None else replace(run, run_dir=target.run_dir, same_as=target.name))
    return linked


def plan(study: StudyConfig) -> list[RunSpec]:
    """Every run in the order they train: the pretrain runs (if any) first, then the arms."""
    return pretrain_runs(study) + grid(study)


def axis_values(study: StudyConfig, axis: str, axes: dict[str, Any] | None = None) -> list[str]:
    """An axis's values as they appear in the table (a variant axis: its variant names), as strings (from
    `axes` where it has the axis, e.g. a profile's)."""
    values = (axes or {}).get(axis, study.axes[axis])
    return [str(v) for v in (values.keys() if isinstance(values, dict) else values)]
