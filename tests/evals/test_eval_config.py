"""The evaluator owns its configuration (`workbench_eval.config`): the library keeps an experiment config's `eval:`
section as an opaque mapping, the evaluator checks it with the config's one-line errors, and refuses
`eval.on_save` for runs it cannot score. Also: hub access off only while the evaluator works, and which numbers of
experts an SMoE checkpoint runs at."""

from __future__ import annotations

import json
import os

import pytest
from conftest import tiny_config, train_main, write_config

from workbench.config import ExperimentConfig, config_yaml, load_config
from workbench.errors import ConfigError
from workbench_eval.config import (
    STUDY_CHECKS,
    EvalConfig,
    check_eval_section,
    eval_config,
    load_eval_config,
)
from workbench_eval.evaluator import OFFLINE, hub_offline
from workbench_eval.on_save import check_on_save


def test_the_library_keeps_the_section_as_given(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, eval={"limit": 0, "no_such_field": 1}))
    cfg = load_config(path)  # not the library's to check
    assert cfg.eval == {"limit": 0, "no_such_field": 1}
    assert ExperimentConfig().eval == {}


@pytest.mark.parametrize(("section", "overrides", "origin", "message"), [
    ({"on_sav": True}, [], "file", "unknown field 'eval.on_sav' (did you mean 'on_save'?)"),
    ({"limit": 0}, [], "file", "field 'eval.limit': Input should be greater than or equal to 1 (got 0)"),
    ({"tasks": [{"tsk": "a"}]}, [], "file", "field 'eval.tasks.0.task': Field required"),
    ({"experts": [0, 1]}, [], "file", "field 'eval.experts': experts must be `all` or a non-empty list"),
    ({}, ["eval.limit=0"], "--set eval.limit=0", "field 'eval.limit': Input should be greater than or equal to 1"),
    ({}, ["eval.on_sav=true"], "--set eval.on_sav=true", "unknown field 'eval.on_sav' (did you mean 'on_save'?)"),
    ({"batch_size": "big"}, [], "file",
     "field 'eval.batch_size': batch_size must be an integer >= 1, `auto` or `auto:N` (N >= 1), got 'big'"),
    ({"batch_size": 0}, [], "file", "field 'eval.batch_size': batch_size must be an integer >= 1, `auto` or `auto:N`"),
    ({}, ["eval.batch_size=auto:0"], "--set eval.batch_size=auto:0", "field 'eval.batch_size': batch_size must be"),
    ({"dtype": "fp8"}, [], "file", "field 'eval.dtype': Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"on_save_timeout": 0}, [], "file", "field 'eval.on_save_timeout': Input should be greater than or equal to 1"),
])
def test_a_bad_field_names_the_field_and_where_it_came_from(tmp_path, section, overrides, origin, message):
    path = write_config(tmp_path, tiny_config(tmp_path, eval=section))
    cfg = load_config(path, overrides)
    with pytest.raises(ConfigError) as err:
        check_eval_section(cfg, path, overrides)
    text = str(err.value)
    assert text.startswith(f"{path if origin == 'file' else origin}: ") and message in text and "\n" not in text
    with pytest.raises(ConfigError, match="eval"):
        eval_config(cfg)


def test_the_section_stays_as_given_and_the_evaluator_fills_in_the_defaults(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, eval={"limit": 5}))
    cfg = load_config(path, ["eval.experts=[2, 1, 2]"])
    evaluation = check_eval_section(cfg, path, ["eval.experts=[2, 1, 2]"])
    assert evaluation == EvalConfig(limit=5, experts=[1, 2]) and evaluation.on_save_limit == 50
    assert cfg.eval == {"limit": 5, "experts": [2, 1, 2]}  # what --dry-run prints and config.yaml records
    assert "eval:\n  limit: 5\n" in config_yaml(cfg)
    assert eval_config(cfg) == evaluation


def test_a_bad_eval_field_stops_training_before_any_work(tmp_path, capsys):
    cfg = tiny_config(tmp_path, eval={"limit": 0})
    assert train_main([str(write_config(tmp_path, cfg)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "field 'eval.limit'" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("batch_size", [1, 64, "auto", "auto:4"])
def test_batch_size_is_a_number_or_lm_evals_auto(tmp_path, batch_size):
    path = write_config(tmp_path, tiny_config(tmp_path, eval={"batch_size": batch_size}))
    assert check_eval_section(load_config(path), path).batch_size == batch_size


def test_auto_batch_size_is_detected_on_a_gpu_and_fixed_on_cpu():
    import torch

    from workbench_eval.evaluator import CPU_BATCH_SIZE, lm_batch_size

    assert lm_batch_size("auto:2", torch.device("cuda", 0)) == "auto:2" and lm_batch_size(16, "cuda") == 16
    assert lm_batch_size("auto", torch.device("cpu")) == CPU_BATCH_SIZE and lm_batch_size(16, "cpu") == 16


@pytest.mark.parametrize(("sections", "fragments"), [
    ({"data": {"source": "synthetic:fact_tf"}}, ["field 'eval.on_save'", "this run classifies texts"]),
    ({"model": {"preset": "t5-tiny", "overrides": {}}}, ["field 'eval.on_save'", "encoder-decoder"]),
])
def test_on_save_is_refused_for_runs_the_evaluator_cannot_score(tmp_path, sections, fragments):
    cfg = ExperimentConfig.model_validate({**sections, "eval": {"on_save": True}})
    with pytest.raises(ConfigError) as err:
        check_on_save(cfg)
    assert all(f in str(err.value) for f in fragments) and "\n" not in str(err.value)
    check_on_save(ExperimentConfig.model_validate(sections))  # without on_save: nothing to refuse


def test_an_eval_only_file(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("limit: 3\ntasks: [{task: factworld_qa, styles: [zero_shot]}]\n")
    assert load_eval_config(path).limit == 3
    path.write_text("eval: {limit: 0}\n")
    with pytest.raises(ConfigError, match=r"eval.yaml: field 'eval.limit'"):
        load_eval_config(path)


def test_study_checks_know_which_columns_a_run_writes_as_it_trains():
    evaluated = ExperimentConfig.model_validate(
        {"eval": {"on_save": True, "tasks": [{"task": "factworld_qa", "styles": ["zero_shot"]}]}})
    assert STUDY_CHECKS.logs_column(evaluated, "factworld_qa.zero_shot.f1")
    assert not STUDY_CHECKS.logs_column(evaluated, "factworld_qa.letter.f1")
    assert not STUDY_CHECKS.logs_column(ExperimentConfig(), "factworld_qa.zero_shot.f1")  # on_save off
    defaults = ExperimentConfig.model_validate({"eval": {"on_save": True}})  # default tasks, every style
    assert STUDY_CHECKS.logs_column(defaults, "factworld_mc.blank_ppl.acc")


def test_hub_access_is_off_only_while_the_evaluator_works(monkeypatch):
    for key in OFFLINE:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # set by the user: left alone
    before = dict(os.environ)
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert dict(os.environ) == before


def test_runnable_expert_counts(tmp_path):
    from workbench.models.moe_model import expert_levels, runnable_expert_counts

    assert expert_levels(16) == [1, 2, 4, 8, 16] and expert_levels(6) == [1, 2, 4, 6] and expert_levels(1) == [1]
    (tmp_path / "config.json").write_text(json.dumps({"smoe": {"num_experts": 4, "layers": [0]}}))
    assert runnable_expert_counts(tmp_path) == [1, 2, 3, 4]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert runnable_expert_counts(tmp_path) == [] and runnable_expert_counts(tmp_path / "missing") == []
