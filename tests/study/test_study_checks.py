"""Planning-time checks of a study (collected metrics, compare and plot references), the collection-time
warning for a metric no run logged, and the study package's layering."""

from __future__ import annotations

import ast
import json

import pytest
from conftest import REPO, tiny_config, write_config
from study_files import launch, write_study

from workbench.errors import ConfigError
from workbench.study import STATUS, PlotSpec, grid, load_study, write_results
from workbench_eval.config import STUDY_CHECKS


def _load(tmp_path, **fields):
    """load_study of a written study, with its planning warnings (and the evaluator's checks, as the command)."""
    warnings: list[str] = []
    return load_study(write_study(tmp_path, **fields), on_warning=warnings.append, evaluator=STUDY_CHECKS), warnings


@pytest.mark.integration
def test_a_compare_reference_that_is_not_an_axis_value_stops_the_study(tmp_path):
    delta = {"kind": "delta", "axis": "training.learning_rate", "keys": ["loss"]}
    study, warnings = _load(tmp_path, compare=[{**delta, "reference": 1e-3}])
    assert study.compare[0].reference == 1e-3 and warnings == []
    with pytest.raises(ConfigError, match=r"field 'compare\[0\].reference': 0.005 is not a value of axis"):
        _load(tmp_path, compare=[{**delta, "reference": 5e-3}])
    with pytest.raises(ConfigError, match=r"field 'compare\[0\].axis': 'training.lr' is not an axis"):
        _load(tmp_path, compare=[{**delta, "axis": "training.lr", "reference": 1e-3}])
    with pytest.raises(ConfigError, match=r"field 'compare\[0\].keys': 'eval_nll' is not a column.*collect"):
        _load(tmp_path, compare=[{**delta, "reference": 1e-3, "keys": ["eval_nll"]}])
    agreement = {"kind": "agreement", "group": "training.learning_rate", "x": "seed", "y": "loss"}
    with pytest.raises(ConfigError, match=r"field 'compare\[0\].x': 'seed' is not an axis"):
        _load(tmp_path, compare=[agreement])
    with pytest.raises(ConfigError, match=r"field 'plots\[0\].group': 'model.preset' is not an axis"):
        _load(tmp_path, plots=[{"kind": "final", "x": "training.learning_rate", "y": "loss", "group": "model.preset"}])
    # through the command line: --dry-run no longer passes; one line naming the field, exit 2, nothing written
    path = write_study(tmp_path, compare=[{**delta, "reference": 5e-3}])
    result = launch(str(path), "--dry-run")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: field 'compare[0].reference': 0.005 is not a value of axis 'training.learning_rate' "
        "(its values: 0.001, 0.002)"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_collecting_a_metric_no_run_logs_is_an_error_and_one_that_may_not_be_a_warning(tmp_path):
    with pytest.raises(ConfigError, match="field 'collect': no run logs 'eval_los' \\(did you mean 'eval_loss'"):
        _load(tmp_path, collect=["eval_los"])
    with pytest.raises(ConfigError, match="field 'collect': no run logs 'accuracy'"):
        _load(tmp_path, collect=["loss", "accuracy:max"])
    # without validation data no run evaluates, so eval_loss cannot be logged
    with pytest.raises(ConfigError, match="no run logs 'eval_loss'.*validation_fraction is 0"):
        _load(tmp_path, collect=["eval_loss"], set={"data.validation_fraction": 0.0})
    with pytest.raises(ConfigError, match=r"field 'plots\[0\].y': no run logs 'nll'"):
        _load(tmp_path, plots=[{"kind": "curve", "y": "nll"}])
    with pytest.raises(ConfigError, match=r"field 'plots\[0\].y': an `experts` plot takes an evaluator column"):
        _load(tmp_path, plots=[{"kind": "experts", "y": "loss"}])
    with pytest.raises(ConfigError, match=r"field 'compare\[0\].against': 'x' is not one of its keys"):
        _load(tmp_path, compare=[{"kind": "delta", "axis": "training.learning_rate", "reference": 1e-3,
                                  "keys": ["loss"], "against": {"x": "loss"}}])
    # logged by every run: no warning
    _, warnings = _load(tmp_path, collect=["loss", "eval_loss", "eval_token_accuracy:max", "grad_norm", "total_flos"])
    assert warnings == []
    # may be logged, cannot be known in advance: a warning each, naming the field and the reason
    _, warnings = _load(tmp_path, collect=["loss", "train_mem_cpu_alloc_delta", "factworld_qa.zero_shot.f1"])
    assert len(warnings) == 2 and all("field 'collect'" in w for w in warnings)
    assert "'train_mem_cpu_alloc_delta' may not be logged" in warnings[0] and "Trainer" in warnings[0]
    assert "'factworld_qa.zero_shot.f1'" in warnings[1] and "evaluator column" in warnings[1]
    # a method that declares its `logged_metrics`: those are known, anything else it cannot log
    _, warnings = _load(tmp_path, collect=["loss", "dropout_rate"], set={"methods.dropout_schedule.rate": 0.1})
    assert warnings == []
    with pytest.raises(ConfigError, match="field 'collect': no run logs 'dropout_rat'"):
        _load(tmp_path, collect=["loss", "dropout_rat"], set={"methods.dropout_schedule.rate": 0.1})
    evaluated = {"eval.on_save": True, "eval.tasks": [{"task": "factworld_qa", "styles": ["zero_shot"]}]}
    _, warnings = _load(tmp_path, collect=["loss", "factworld_qa.zero_shot.f1"], set=evaluated)
    assert warnings == []
    # the command line prints the warning on stderr and goes on
    path = write_study(tmp_path, collect=["loss", "train_mem_cpu_alloc_delta"])
    result = launch(str(path), "--dry-run")
    assert result.returncode == 0 and "warning:" in result.stderr and "train_mem_cpu_alloc_delta" in result.stderr


@pytest.mark.integration
def test_a_bad_eval_field_stops_the_study_before_any_run(tmp_path):
    """The evaluator's `eval:` section of every run's config is checked at planning, by the evaluator (the
    library keeps it opaque): through `load_study(..., evaluator=STUDY_CHECKS)` and the command line."""
    with pytest.raises(ConfigError, match=r"study.yaml: run '.*': --set eval.limit=0: field 'eval.limit'"):
        _load(tmp_path, set={"eval.limit": 0})
    result = launch(str(write_study(tmp_path, set={"eval.on_sav": True})), "--dry-run")
    assert result.returncode == 2 and "unknown field 'eval.on_sav' (did you mean 'on_save'?)" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_collected_metric_no_run_logged_is_a_visible_warning_at_collection(tmp_path):
    study, _ = _load(tmp_path, collect=["loss", "train_mem_cpu_alloc_delta"],
                     compare=[{"kind": "delta", "axis": "training.learning_rate", "reference": 1e-3, "keys": ["loss"]}])
    runs = grid(study)
    for run in runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0 + run.seed}) + "\n")
        (run.run_dir / STATUS).write_text("status: done\n")
    warnings: list[str] = []
    study.plots.append(PlotSpec(kind="curve", y="loss"))
    results, report = write_results(study, runs, on_warning=warnings.append)
    assert len(warnings) == 1 and "'train_mem_cpu_alloc_delta' is in no run's results (collected)" in warnings[0]
    assert "`train_mem_cpu_alloc_delta` (collected)" in report.read_text()
    assert "delta_loss_mean" in results.read_text()
    # a delta whose reference runs logged nothing is named too
    (runs[0].run_dir / "metrics.jsonl").write_text("")
    (runs[1].run_dir / "metrics.jsonl").write_text("")
    warnings.clear()
    write_results(study, runs, on_warning=warnings.append)
    assert any("'delta_loss' is in no run's results (compare: delta against training.learning_rate = 0.001)" in w
               for w in warnings)
    # before any run is done nothing is expected, so nothing is warned about
    for run in runs:
        (run.run_dir / STATUS).unlink()
    warnings.clear()
    write_results(study, runs, on_warning=warnings.append)
    assert warnings == []


def test_the_study_package_never_imports_the_evaluator():
    """`workbench.study` is library code: it reads the evaluator's results files but never imports `workbench_eval`."""
    imported = set()
    for path in (REPO / "workbench" / "study").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {(path.name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((path.name, node.module or ""))
    assert ("analysis.py", "workbench.stats") in imported
    assert [(f, m) for f, m in imported if m == "workbench_eval" or m.startswith("workbench_eval.")] == []
    assert not list((REPO / "workbench").glob("study_*.py"))  # the old flat modules are gone


def test_a_method_that_does_not_declare_its_metrics_makes_a_key_a_warning(tmp_path, monkeypatch):
    """A method class by its `package.module:Class` name, without `logged_metrics`: it may log anything."""
    monkeypatch.syspath_prepend(str(REPO))
    from workbench.config import load_config
    from workbench.study.metrics import run_logs

    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path, methods={"tests.integration.hook_probe:HookProbe": {}})))
    assert "method 'tests.integration.hook_probe:HookProbe' may log it" in run_logs(cfg, "probe_metric")
