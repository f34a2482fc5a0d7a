"""The study runner: grid, skip, resume, failure handling, aggregation, --only, submitit's local executor."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run, tiny_config, write_config

from workbench.errors import ConfigError
from workbench.study import aggregate, collect_run, grid, load_study, run_status

STUDY = REPO / "launch" / "study.py"


def _study(tmp_path: Path, **fields) -> Path:
    base = write_config(tmp_path, tiny_config(tmp_path, training={"max_steps": 4, "save_steps": 2}), "base.yaml")
    study = {"study": "s", "base": str(base), "runs_dir": str(tmp_path / "runs"),
             "axes": {"training.learning_rate": [1e-3, 2e-3]}, "seeds": [0, 1], "collect": ["loss"], **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _launch(*args: str):
    return run([sys.executable, str(STUDY), *args])


def test_grid_names_and_zip(tmp_path):
    study = load_study(_study(tmp_path, axes={"training.learning_rate": [1e-3, 2e-3],
                                              "model.preset": ["pythia-tiny", "llama-tiny"]}, combine="zip"))
    names = [r.name for r in grid(study)]
    assert names == ["learning_rate=0.001_preset=pythia-tiny_seed=0", "learning_rate=0.001_preset=pythia-tiny_seed=1",
                     "learning_rate=0.002_preset=llama-tiny_seed=0", "learning_rate=0.002_preset=llama-tiny_seed=1"]
    with pytest.raises(ConfigError, match="same number of values"):
        load_study(_study(tmp_path, axes={"a.b": [1, 2], "c.d": [1]}, combine="zip"))
    with pytest.raises(ConfigError, match="training.learnig_rate"):
        load_study(_study(tmp_path, set={"training.learnig_rate": 1}))


def test_study_runs_skips_resumes_and_records_failures(tmp_path):
    path = _study(tmp_path, axes={"training.learning_rate": [1e-3, "fast"]}, seeds=[0, 1])
    result = _launch(str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    study = load_study(path)
    runs = grid(study)
    statuses = {r.name: run_status(r) for r in runs}
    assert [s["status"] for s in statuses.values()] == ["done", "done", "failed", "failed"]
    assert "learning_rate" in statuses["learning_rate=fast_seed=0"]["error"]  # the one-line config error
    rows = list(csv.DictReader((tmp_path / "runs/s/results.csv").open()))
    assert rows[0]["loss_n"] == "2" and float(rows[0]["loss_std"]) >= 0
    # a finished run is skipped
    log = runs[0].run_dir / "train.log"
    size = log.stat().st_size
    assert _launch(str(path)).returncode == 0 and log.stat().st_size == size
    # a killed run (no status, newest checkpoint gone) resumes from its checkpoint
    (runs[1].run_dir / "study_status.json").unlink()
    shutil.rmtree(runs[1].run_dir / "checkpoint-4")
    assert _launch(str(path), "--only", runs[1].name).returncode == 0
    assert "resuming from" in (runs[1].run_dir / "train.log").read_text()
    assert run_status(runs[1])["status"] == "done" and (runs[1].run_dir / "checkpoint-4").is_dir()


def test_dry_run_and_unknown_only(tmp_path):
    path = _study(tmp_path)
    lines = _launch(str(path), "--dry-run").stdout.strip().splitlines()
    assert len(lines) == 4 and all("\tpending\t" in line for line in lines)
    bad = _launch(str(path), "--only", "nope")
    assert bad.returncode == 2 and "no run named 'nope'" in bad.stderr


def test_aggregation_against_hand_made_metrics(tmp_path):
    study = load_study(_study(tmp_path))
    runs = grid(study)
    losses = {0: [3.0, 2.0, 2.5], 1: [4.0, 1.0, 3.0]}
    for r in runs:
        r.run_dir.mkdir(parents=True)
        with (r.run_dir / "metrics.jsonl").open("w") as handle:
            for step, loss in enumerate(losses[r.seed], start=1):
                handle.write(f'{{"step": {step}, "loss": {loss}}}\n')
    (runs[1].run_dir / "eval").mkdir()
    (runs[1].run_dir / "eval" / "results.jsonl").write_text(
        '{"step": 2, "task": "t", "style": "s", "metric": "acc", "value": 0.25}\n'
        '{"step": 3, "task": "t", "style": "s", "metric": "acc", "value": 0.5}\n'
        '{"step": 3, "checkpoint": "checkpoint-4", "status": "skipped", "reason": "corrupt"}\n')
    row = collect_run(runs[1], ["loss"])
    assert (row["loss"], row["min_loss"], row["argmin_loss"]) == (3.0, 1.0, 2)
    assert row["t.s.acc"] == 0.5  # the last evaluated checkpoint's score
    table = aggregate([collect_run(r, ["loss"]) for r in runs], list(study.axes), ["loss", "min_loss"])
    assert len(table) == 2
    assert table[0]["loss_mean"] == pytest.approx(2.75) and table[0]["loss_std"] == pytest.approx(0.3535534, 1e-6)
    assert table[0]["min_loss_mean"] == pytest.approx(1.5) and table[0]["loss_n"] == 2
    from workbench.study import PlotSpec
    from workbench.study_report import write_results

    study.plots.extend([PlotSpec(kind="final", x="training.learning_rate", y="loss"),
                        PlotSpec(kind="curve", y="loss", name="loss_curves")])
    results, report = write_results(study, runs)
    text = report.read_text()
    assert "![loss_vs_training.learning_rate](loss_vs_training.learning_rate.png)" in text
    assert (results.parent / "loss_curves.png").is_file()
    rows = list(csv.DictReader(results.open()))
    assert {r["training.learning_rate"] for r in rows} == {"0.001", "0.002"} and "t.s.acc_mean" in rows[1]


def test_submitit_local_executor(tmp_path):
    path = _study(tmp_path, seeds=[0], axes={"training.learning_rate": [1e-3]})
    result = _launch(str(path), "--executor", "submitit-local")
    assert result.returncode == 0, result.stderr[-2000:]
    (only,) = grid(load_study(path))
    assert run_status(only)["status"] == "done"
    assert list((tmp_path / "runs/s/submitit").glob("*_result.pkl"))
