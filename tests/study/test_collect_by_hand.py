"""`launch/study.py --collect RUN_DIR ...`: one table, report and plots across runs launched by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from study_files import launch

from workbench.errors import ConfigError
from workbench.study import hand_study


def _hand_run(tmp_path: Path, name: str, lr: float, seed: int, losses: list[float], finished: bool = True) -> Path:
    """A run folder as launch/train.py leaves it: config.yaml and metrics.jsonl (eval_loss at the end)."""
    folder = tmp_path / "runs" / name
    folder.mkdir(parents=True)
    cfg = tiny_config(tmp_path, name=name, seed=seed, training={"learning_rate": lr})
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [{"step": step, "loss": loss} for step, loss in enumerate(losses, start=1)]
    records.append({"step": len(losses), "eval_loss": losses[-1] + 0.5})
    if finished:
        records.append({"step": len(losses), "train_runtime": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.integration
def test_collect_runs_launched_by_hand_into_a_table_report_and_plots(tmp_path):
    a = _hand_run(tmp_path, "a", 1e-3, 0, [3.0, 2.0])
    b = _hand_run(tmp_path, "b", 1e-3, 1, [3.0, 1.0])
    c = _hand_run(tmp_path, "c", 2e-3, 0, [4.0, 3.5], finished=False)
    out = tmp_path / "table"
    result = launch("--collect", str(a), str(b), str(c), "--out", str(out), "--metric", "loss", "--metric",
                    "eval_loss", "--metric", "grad_norm")
    assert result.returncode == 0, result.stderr
    assert "3 runs (they differ in: training.learning_rate)" in result.stdout
    # a collected metric that no run logged is a visible warning, never dropped silently
    assert "warning:" in result.stderr and "'grad_norm' is in no run's results" in result.stderr
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["run"], r["seed"], r["training.learning_rate"], r["status"]) for r in runs] == [
        (str(a), "0", "0.001", "done"), (str(b), "1", "0.001", "done"), (str(c), "0", "0.002", "unfinished")]
    assert (runs[1]["loss"], runs[1]["best_loss"]) == ("1.0", "1.0")
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["training.learning_rate"] for r in table] == ["0.001", "0.002"]
    assert float(table[0]["loss_mean"]) == pytest.approx(1.5) and table[0]["loss_n"] == "2"  # seeds pooled
    assert float(table[0]["eval_loss_mean"]) == pytest.approx(2.0) and table[1]["loss_n"] == "1"
    report = (out / "report.md").read_text()
    assert "they differ in: training.learning_rate" in report and "`grad_norm` (collected)" in report
    assert "![loss_curves](loss_curves.png)" in report and (out / "eval_loss_curves.png").is_file()
    assert "3 runs (2 done, 1 unfinished)" in report and not (out / "grad_norm_curves.png").exists()


def test_runs_that_differ_only_by_seed_pool_into_one_row(tmp_path):
    a = _hand_run(tmp_path, "a", 1e-3, 0, [3.0, 2.0])
    b = _hand_run(tmp_path, "b", 1e-3, 1, [3.0, 1.0])
    study, runs, out = hand_study([a, b])
    assert study.axes == {} and study.seeds == [0, 1] and study.collect == ["eval_loss", "loss"]
    assert out == tmp_path / "runs" / "collected"  # beside the runs by default
    assert "nothing but the seed" in study.description
    assert [r.stage for r in runs] == ["hand", "hand"] and runs[1].seed == 1


@pytest.mark.integration
def test_bad_run_folders_and_metrics_are_one_line_errors_and_nothing_is_written(tmp_path):
    a = _hand_run(tmp_path, "a", 1e-3, 0, [3.0, 2.0])
    (tmp_path / "runs" / "empty").mkdir()
    with pytest.raises(ConfigError, match="run folder '.*empty' has no config.yaml"):
        hand_study([a, tmp_path / "runs" / "empty"])
    with pytest.raises(ConfigError, match="run folder '.*nope' not found"):
        hand_study([a, tmp_path / "nope"])
    with pytest.raises(ConfigError, match="run folder '.*a' is given twice"):
        hand_study([a, a])
    with pytest.raises(ConfigError, match="--metric: collect 'loss:best'"):
        hand_study([a], ["loss:best"])
    result = launch("--collect", str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "table"))
    assert result.returncode == 2 and result.stderr.strip() == f"error: --collect: run folder '{tmp_path / 'nope'}' not found"
    assert not (tmp_path / "table").exists()
