"""Two-stage studies with `pretrain.per: <axis>`: one pretrain run per value of that axis, each arm starting
from the one of its value."""

from __future__ import annotations

import pytest
import yaml
from study_files import launch, write_study

from workbench.errors import ConfigError
from workbench.study import grid, load_study, plan, pretrain_for, pretrain_runs, run_status

ARMS = {"arm": {"a": {"training.learning_rate": 1e-3}, "b": {"training.learning_rate": 2e-3}}}
TOO_MUCH = {"data.repetition.budget_tokens": 2**22, "data.repetition.unique_tokens": 2**22}  # fails at run time


def per_arm(tmp_path, set_per_value=None, **fields):
    """A study over the tiny config: arms a and b, one pretrain run each (2 steps; b's with its own overrides)."""
    pretrain = {"set": {"training.max_steps": 2}, "per": "arm",
                "set_per_value": {"b": {"training.max_steps": 4}} if set_per_value is None else set_per_value}
    return write_study(tmp_path, axes=ARMS, pretrain={**pretrain, **fields.pop("pretrain", {})}, **fields)


def test_one_pretrain_run_per_axis_value_and_each_arm_starts_from_its_own(tmp_path):
    study = load_study(per_arm(tmp_path))
    runs = plan(study)
    first, arms = runs[:2], runs[2:]
    folder = tmp_path / "runs" / "s"
    assert [r.name for r in first] == ["pretrain_arm=a", "pretrain_arm=b"] == [r.name for r in pretrain_runs(study)]
    assert [(r.stage, r.run_dir, r.values, r.config) for r in first] == [
        ("pretrain", folder / "pretrain_arm=a", {"arm": "a"}, study.base),
        ("pretrain", folder / "pretrain_arm=b", {"arm": "b"}, study.base)]
    assert first[0].settings == {"training.max_steps": 2} and first[1].settings == {"training.max_steps": 4}
    assert arms == grid(study) and len(arms) == 4 and all(r.stage == "arm" for r in arms)
    for arm in arms:  # the arm's own value's pretrain folder, as its model
        own = first[0] if arm.values["arm"] == "a" else first[1]
        assert pretrain_for(study, arm.values) == own
        assert arm.settings["model.name_or_path"] == str(own.run_dir) and arm.settings["model.preset"] is None
    # under another key (`as`), a list axis (numbers as set_per_value keys), a value left out of set_per_value
    key = "methods.sinkd.teacher"
    study = load_study(write_study(tmp_path, set={"methods.sinkd.beta": 0.01}, pretrain={
        "as": key, "per": "training.learning_rate", "set_per_value": {0.002: {"training.max_steps": 3}}}))
    first, arms = plan(study)[:2], plan(study)[2:]
    assert [r.name for r in first] == ["pretrain_learning_rate=0.001", "pretrain_learning_rate=0.002"]
    assert first[0].settings == {} and first[1].settings == {"training.max_steps": 3}
    for arm in arms:
        own = first[0] if arm.values["training.learning_rate"] == 1e-3 else first[1]
        assert arm.settings[key] == str(own.run_dir) and "model.name_or_path" not in arm.settings


def test_a_seeded_pretrain_stage_has_one_run_per_value_and_seed(tmp_path):
    study = load_study(per_arm(tmp_path, seeds=[0, 1], pretrain={"seeded": True}))
    first = pretrain_runs(study)
    assert [(r.name, r.seed) for r in first] == [("pretrain_arm=a_seed=0", 0), ("pretrain_arm=a_seed=1", 1),
                                                 ("pretrain_arm=b_seed=0", 0), ("pretrain_arm=b_seed=1", 1)]
    assert all(f"seed={r.seed}" in r.overrides() for r in first)  # trained with that seed
    assert first[2].settings == {"training.max_steps": 4}
    for arm in grid(study):  # its own value's and its own seed's
        own = pretrain_for(study, arm.values, arm.seed)
        assert own.values == {"arm": arm.values["arm"]} and own.seed == arm.seed
        assert arm.settings["model.name_or_path"] == str(own.run_dir)
    with pytest.raises(ValueError, match="needs the arm's seed"):
        pretrain_for(study, {"arm": "a"})
    # without `per`: one pretrain run per seed; a profile may switch it off
    path = write_study(tmp_path, axes=ARMS, seeds=[3, 4], pretrain={"set": {"training.max_steps": 2}, "seeded": True},
                       profiles={"quick": {"pretrain": {"seeded": False}}})
    assert [r.name for r in pretrain_runs(load_study(path))] == ["pretrain_seed=3", "pretrain_seed=4"]
    assert [r.name for r in pretrain_runs(load_study(path, "quick"))] == ["pretrain"]


def test_a_profile_changes_the_per_value_pretrain_runs(tmp_path):
    profiles = {"quick": {"seeds": [0], "axes": {"arm": {"a": {}}},
                          "pretrain": {"set": {"training.learning_rate": 5e-3},
                                       "set_per_value": {"a": {"training.max_steps": 3}}}},
                "both": {"pretrain": {"set_per_value": {"b": {"training.warmup_steps": 1}}}}}
    path = per_arm(tmp_path, profiles=profiles)
    quick = load_study(path, "quick")  # b (and its set_per_value) dropped; a's own overrides over the merged set
    assert [(r.name, r.settings) for r in pretrain_runs(quick)] == [
        ("pretrain_arm=a", {"training.max_steps": 3, "training.learning_rate": 5e-3})]
    assert plan(quick)[1].settings["model.name_or_path"] == str(tmp_path / "runs" / "s-quick" / "pretrain_arm=a")
    both = pretrain_runs(load_study(path, "both"))  # a value's entries merged over the study's
    assert both[1].settings == {"training.max_steps": 4, "training.warmup_steps": 1}
    with pytest.raises(ConfigError, match=r"profile 'quick': field 'pretrain.set_per_value': 'b' is not a value"):
        load_study(per_arm(tmp_path, profiles={"quick": {"axes": {"arm": {"a": {}}},
                                                         "pretrain": {"set_per_value": {"b": {}}}}}), "quick")
    with pytest.raises(ConfigError, match=r"profile 'quick': field 'pretrain.per': a profile keeps"):
        load_study(per_arm(tmp_path, profiles={"quick": {"pretrain": {"per": "other"}}}), "quick")


@pytest.mark.parametrize(("pretrain", "error"), [
    ({"per": "arms"}, r"field 'pretrain.per': 'arms' is not an axis of the study \(did you mean 'arm'\?\)?; axes: arm"),
    ({"per": "arm", "set_per_value": {"c": {}}},
     r"field 'pretrain.set_per_value': 'c' is not a value of axis 'arm' \(its values: a, b\)"),
    ({"set_per_value": {"a": {}}}, r"field 'pretrain.set_per_value': needs 'pretrain.per'"),
    ({"per": "arm", "set_per_value": {"b": {"training.learnig_rate": 1}}}, r"run 'pretrain_arm=b'.*learnig_rate"),
    ({"per": "arm", "set_per_value": {"b": {"name": "x"}}}, r"pretrain.set_per_value.*'name' is set by the study"),
])
def test_a_bad_per_axis_pretrain_is_a_one_line_error_naming_the_field(tmp_path, pretrain, error):
    with pytest.raises(ConfigError, match=error) as caught:
        load_study(write_study(tmp_path, axes=ARMS, pretrain=pretrain))
    assert "\n" not in str(caught.value)


@pytest.mark.integration
def test_dry_run_lists_every_pretrain_run_first_and_an_arm_waits_for_its_own(tmp_path):
    path = per_arm(tmp_path, seeds=[0])
    result = launch(str(path), "--dry-run")
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["pretrain_arm=a", "pretrain_arm=b", "arm=a_seed=0", "arm=b_seed=0"]
    assert lines[1] == ["pretrain_arm=b", "pending", f"{tmp_path}/runs/s/pretrain_arm=b"]
    assert "study s: 4 runs (the pretrain runs first, then the arms): 4 pending" in result.stderr
    result = launch(str(path), "--only", "arm=b_seed=0")
    assert result.returncode == 2 and "which is pending: train it first (--only pretrain_arm=b)" in result.stderr
    assert not (tmp_path / "runs" / "s" / "arm=b_seed=0").exists()


@pytest.mark.integration
def test_a_failed_per_value_pretrain_run_starts_no_arm(tmp_path):
    result = launch(str(per_arm(tmp_path, seeds=[0], set_per_value={"b": TOO_MUCH})))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the pretrain run 'pretrain_arm=b' failed" in result.stderr and "the arms were not started" in result.stderr
    first, second, *arms = plan(load_study(per_arm(tmp_path, seeds=[0], set_per_value={"b": TOO_MUCH})))
    assert run_status(first)["status"] == "done" and run_status(second)["status"] == "failed"
    assert all(not r.run_dir.exists() for r in arms)
    report = (tmp_path / "runs" / "s" / "report.md").read_text()
    assert "## Pretrain runs" in report and "- `pretrain_arm=a`" in report and "**the arms were not started**" in report


@pytest.mark.integration
def test_a_per_value_two_stage_study_end_to_end(tmp_path):
    """Pretrain runs of 2 (a) and 4 (b) steps, one at a time with --only, then the arms (2 steps each)."""
    path = per_arm(tmp_path, seeds=[0], set={"training.max_steps": 2})
    result = launch(str(path), "--only", "pretrain_arm=a")
    assert result.returncode == 0, result.stderr[-2000:]
    result = launch(str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrain_arm=a: done (finished earlier, skipped" in result.stdout
    first, second, *arms = plan(load_study(path))
    assert [run_status(r)["status"] for r in (first, second, *arms)] == ["done"] * 4
    for arm, own, step in zip(arms, (first, second), (2, 4), strict=True):
        saved = yaml.safe_load((arm.run_dir / "config.yaml").read_text())
        assert saved["model"]["name_or_path"] == str(own.run_dir / f"checkpoint-{step}")
    report = (tmp_path / "runs" / "s" / "report.md").read_text()
    for run in (first, second):
        line = next(line for line in report.splitlines() if line.startswith(f"- `{run.name}`"))
        assert f"`{run.run_dir}`" in line and "**done**" in line and "Its final values: loss " in line
