"""Two-stage studies: a `pretrain` run trained first, once, that every arm starts from."""

from __future__ import annotations

import csv

import pytest
import yaml
from conftest import tiny_config, write_config
from study_files import launch, write_study

from workbench.errors import ConfigError
from workbench.study import grid, load_study, plan, run_status

TOO_MUCH = {"data.repetition.budget_tokens": 2**22, "data.repetition.unique_tokens": 2**22}  # fails at run time


def test_the_pretrain_run_comes_first_and_every_arm_starts_from_it(tmp_path):
    path = write_study(tmp_path, pretrain={"set": {"training.max_steps": 2}},
                       profiles={"quick": {"seeds": [0], "pretrain": {"set": {"training.learning_rate": 5e-3}}}})
    study = load_study(path)
    first, *arms = plan(study)
    folder = tmp_path / "runs" / "s" / "pretrain"
    assert (first.name, first.stage, first.run_dir, first.config) == ("pretrain", "pretrain", folder, study.base)
    assert first.overrides() == ["training.max_steps=2", "name=pretrain", f"runs_dir={tmp_path / 'runs' / 's'}"]
    assert arms == grid(study) and len(arms) == 4 and all(r.stage == "arm" for r in arms)
    assert all(f"model.name_or_path={folder}" in r.overrides() for r in arms)
    quick = load_study(path, "quick")
    assert plan(quick)[0].run_dir == tmp_path / "runs" / "s-quick" / "pretrain"
    assert plan(quick)[0].settings == {"training.max_steps": 2, "training.learning_rate": 5e-3}
    assert f"model.name_or_path={tmp_path / 'runs' / 's-quick' / 'pretrain'}" in plan(quick)[1].overrides()
    # its own config, checked before anything runs like every arm's
    other = write_config(tmp_path, tiny_config(tmp_path, model={"preset": "llama-tiny"}), "other.yaml")
    assert plan(load_study(write_study(tmp_path, pretrain={"config": str(other)})))[0].config == str(other)
    with pytest.raises(ConfigError, match="run 'pretrain'.*training.learnig_rate"):
        load_study(write_study(tmp_path, pretrain={"set": {"training.learnig_rate": 1}}))
    with pytest.raises(ConfigError, match="pretrain.set.*'name' is set by the study"):
        load_study(write_study(tmp_path, pretrain={"set": {"name": "mine"}}))
    with pytest.raises(ConfigError, match="profile 'quick': field 'pretrain': the study has no pretrain run"):
        load_study(write_study(tmp_path, profiles={"quick": {"pretrain": {"set": {}}}}), "quick")


@pytest.mark.integration
def test_dry_run_shows_the_pretrain_run_first_and_an_arm_waits_for_it(tmp_path):
    path = write_study(tmp_path, pretrain={"set": {"training.max_steps": 2}})
    result = launch(str(path), "--dry-run")
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"pretrain\tpending\t{tmp_path}/runs/s/pretrain" and len(lines) == 5
    assert "study s: 5 runs (the pretrain run first, then the arms): 5 pending" in result.stderr
    arm = lines[1].split("\t")[0]
    result = launch(str(path), "--only", arm)
    assert result.returncode == 2 and "which is pending: train it first (--only pretrain)" in result.stderr
    assert not (tmp_path / "runs" / "s" / arm).exists()


@pytest.mark.integration
def test_a_failed_pretrain_run_starts_no_arm(tmp_path):
    path = write_study(tmp_path, seeds=[0], pretrain={"set": TOO_MUCH})
    result = launch(str(path))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the pretrain run failed" in result.stderr and "the arms were not started" in result.stderr
    first, *arms = plan(load_study(path))
    status = run_status(first)
    assert status["status"] == "failed" and "exceeds the corpus" in status["error"]
    assert all(not r.run_dir.exists() for r in arms)
    report = (tmp_path / "runs" / "s" / "report.md").read_text()
    assert "## Pretrain run" in report and f"`{first.run_dir}`" in report and "**the arms were not started**" in report
    assert [r["status"] for r in csv.DictReader((tmp_path / "runs" / "s" / "runs.csv").open())] == ["pending"] * 2


@pytest.mark.integration
def test_a_two_stage_study_end_to_end(tmp_path):
    """A tiny pretrain run (6 steps), then two arms (two learning rates, 2 steps) that start from it."""
    path = write_study(tmp_path, seeds=[0], set={"training.max_steps": 2},
                       pretrain={"set": {"training.max_steps": 6, "training.learning_rate": 5e-3}})
    result = launch(str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    first, *arms = plan(load_study(path))
    assert [run_status(r)["status"] for r in (first, *arms)] == ["done", "done", "done"]
    for arm in arms:  # each arm records the pretrain run's newest checkpoint as the model it started from
        saved = yaml.safe_load((arm.run_dir / "config.yaml").read_text())
        assert saved["model"]["name_or_path"] == str(first.run_dir / "checkpoint-6")
        assert saved["model"]["tokenizer"] == str(first.run_dir / "tokenizer")

    def first_loss(run) -> float:
        return next(r["loss"] for r in map(yaml.safe_load, (run.run_dir / "metrics.jsonl").open()) if "loss" in r)

    assert all(first_loss(arm) < first_loss(first) for arm in arms)  # the arms start from the trained weights
    report = (tmp_path / "runs" / "s" / "report.md").read_text()
    assert "## Pretrain run" in report and f"`{first.run_dir}`" in report and "**done**" in report


def test_pretrain_as_another_key_gives_the_arms_the_folder_there_and_keeps_their_model(tmp_path):
    key = "methods.sinkd.teacher"
    path = write_study(tmp_path, pretrain={"set": {"training.max_steps": 2}, "as": key},
                       set={"methods.sinkd.beta": 0.01},
                       profiles={"quick": {"seeds": [0], "pretrain": {"set": {"training.learning_rate": 5e-3}}}})
    folder = tmp_path / "runs" / "s" / "pretrain"
    first, *arms = plan(load_study(path))
    assert first.stage == "pretrain" and "methods.sinkd.teacher" not in first.settings
    for arm in arms:
        assert arm.settings[key] == str(folder) and "model.name_or_path" not in arm.settings
        assert "model.preset" not in arm.settings
    quick = plan(load_study(path, "quick"))[1]  # a profile's pretrain keeps the study's `as`
    assert quick.settings[key] == str(tmp_path / "runs" / "s-quick" / "pretrain")
    with pytest.raises(ConfigError, match="pretrain.as"):
        load_study(write_study(tmp_path, pretrain={"as": "teacher"}))
