"""The study table's statistics: paired deltas' 95% intervals and evaluator scores at the best validation step."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy import stats

from workbench.stats import t_interval
from workbench.study.collect import aggregate, eval_scores_at_best_validation
from workbench.study.report import _cell


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_t_interval_matches_scipy(n):
    rng = random.Random(n)
    values = [rng.gauss(0.3, 1.0) for _ in range(n)]
    low, high = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    mean = sum(values) / n
    assert t_interval(values) == pytest.approx(high - mean, rel=1e-9)
    assert t_interval(values) == pytest.approx(mean - low, rel=1e-9)
    assert math.isnan(t_interval(values[:1]))


def test_deltas_get_an_interval_and_the_report_says_when_it_holds_zero():
    rows = [{"arm": "a", "delta_x": d, "x": 1.0} for d in (0.1, -0.2, 0.15)]
    rows += [{"arm": "b", "delta_x": d, "x": 1.0} for d in (1.0, 1.1, 0.9)]
    table = {e["arm"]: e for e in aggregate(rows, ["arm"], ["delta_x", "x"])}
    assert "x_ci95" not in table["a"]  # only paired differences get one
    assert "*inside the seed spread*" in _cell(table["a"], "delta_x")
    cell = _cell(table["b"], "delta_x")
    assert "inside" not in cell and cell.startswith("1 ± 0.1 (n=3) [")
    assert float(cell.split("[")[1].split(",")[0]) == pytest.approx(1.0 - t_interval([1.0, 1.1, 0.9]), abs=1e-3)


def test_scores_at_the_checkpoint_with_the_lowest_validation_loss(tmp_path):
    results = tmp_path / "results.jsonl"
    scores = {100: 0.2, 200: 0.5, 300: 0.4}
    results.write_text("".join(json.dumps({"step": s, "task": "t", "style": "zero_shot", "metric": "exact_match",
                                           "value": v, "status": "ok"}) + "\n" for s, v in scores.items()))
    records = [{"step": 100, "eval_loss": 2.0}, {"step": 200, "eval_loss": 1.5}, {"step": 300, "eval_loss": 1.7},
               {"step": 300, "loss": 0.1}]
    assert eval_scores_at_best_validation(results, records) == {"best@t.zero_shot.exact_match": 0.5,
                                                                "best_eval_step": 200}
    assert eval_scores_at_best_validation(results, [{"step": 300, "loss": 1.0}]) == {}  # no validation: nothing
    assert eval_scores_at_best_validation(tmp_path / "none.jsonl", records) == {}


def test_a_delta_plot_draws_intervals_around_zero(tmp_path):
    import matplotlib.image

    from workbench.study import PlotSpec, StudyConfig
    from workbench.study.report import draw

    rows = [{"arm": arm, "seed": s, "delta_x": d} for arm, ds in (("ref", (0, 0, 0)), ("b", (0.1, 0.3, 0.2)))
            for s, d in enumerate(ds)]
    table = aggregate(rows, ["arm"], ["delta_x"])
    study = StudyConfig(study="s", base="b.yaml", axes={"arm": ["ref", "b"]})
    path = draw(PlotSpec(kind="final", x="arm", y="delta_x", name="d"), study, [], table, tmp_path)
    assert path == tmp_path / "d.png" and matplotlib.image.imread(path).shape[0] > 100


def _fake_repetition_run(folder, budget, unique, steps, hidden=8):
    """A run folder as training leaves it: config.yaml with data.repetition, metrics.jsonl, one checkpoint."""
    import numpy as np
    import yaml
    from safetensors.numpy import save_file

    from workbench.layout import MANIFEST, METRICS, RUN_CONFIG

    folder.mkdir(parents=True)
    (folder / RUN_CONFIG).write_text(yaml.safe_dump(
        {"data": {"repetition": {"budget_tokens": budget, "unique_tokens": unique}}}))
    records = [{"step": s, "epoch": s / steps, "eval_nll": 3.0 - s / steps} for s in range(4, steps + 1, 4)]
    (folder / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint = folder / f"checkpoint-{steps}"
    checkpoint.mkdir()
    save_file({"a": np.zeros((hidden, 3), np.float32), "b": np.zeros(5, np.float32)}, str(checkpoint / "model.safetensors"))
    size = (checkpoint / "model.safetensors").stat().st_size
    (checkpoint / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": size}}))
    return folder


def test_run_columns_and_curves_in_epochs_of_the_unique_tokens(tmp_path):
    from workbench.study.collect import epochs_per_step, run_columns
    from workbench.study.report import curve_points

    run = _fake_repetition_run(tmp_path / "r", budget=64 * 128, unique=16 * 128, steps=32)
    columns = run_columns(run)
    assert columns == {"parameters": 8 * 3 + 5, "epochs": 4.0, "unique_tokens_per_parameter": 16 * 128 / 29}
    assert epochs_per_step(run) == pytest.approx(4 / 32)
    points = curve_points(run, "eval_nll", x="epochs")
    assert points[-1][0] == pytest.approx(4.0) and points[0][0] == pytest.approx(0.5)
    assert curve_points(run, "eval_nll")[-1][0] == 32
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_columns(plain) == {} and epochs_per_step(plain) is None and curve_points(plain, "eval_nll", "epochs") == []


def test_a_named_delta_pairs_with_its_own_reference_and_keeps_the_plain_delta():
    from workbench.study.analysis import add_deltas
    from workbench.study.plan import DeltaSpec

    rows = [{"seed": 0, "u": u, "schedule": s, "x": x} for u, s, x in
            [(1, "fixed", 1.0), (1, "single", 1.0), (4, "fixed", 2.0), (4, "single", 3.0)]]
    add_deltas(rows, DeltaSpec(axis="u", reference=1, keys=["x"]), ["u", "schedule"])
    add_deltas(rows, DeltaSpec(axis="schedule", reference="single", keys=["x"], name="delta_vs_control"),
               ["u", "schedule"])
    by = {(r["u"], r["schedule"]): r for r in rows}
    assert by[(4, "fixed")]["delta_x"] == 1.0 and by[(4, "single")]["delta_x"] == 2.0
    assert by[(4, "fixed")]["delta_vs_control_x"] == -1.0 and by[(1, "fixed")]["delta_vs_control_x"] == 0.0
    with pytest.raises(ValueError):
        DeltaSpec(axis="u", reference=1, keys=["x"], name="versus")


def test_a_curve_plot_in_epochs_with_a_reference_line(tmp_path):
    import matplotlib.image

    from workbench.study import PlotSpec, RunSpec, StudyConfig
    from workbench.study.report import draw

    runs = [RunSpec(f"u{u}", {"u": u}, 0, _fake_repetition_run(tmp_path / f"u{u}", 64 * 128, u * 128, 32))
            for u in (64, 16, 4)]
    study = StudyConfig(study="s", base="b.yaml", axes={"u": [64, 16, 4]})
    plot = PlotSpec(kind="curve", x="epochs", y="eval_nll", reference={"u": 64}, logx=True, name="c")
    path = draw(plot, study, runs, [], tmp_path)
    assert matplotlib.image.imread(path).shape[0] > 100


def test_the_primary_metric_leads_the_report_with_its_paired_differences():
    from workbench.study import StudyConfig
    from workbench.study.report import _primary_lines

    rows = [{"arm": arm, "seed": s, "acc": a, "best_acc": a + 0.01, "delta_acc": a - 0.5, "nll": 1.0}
            for arm, values in (("ref", (0.5, 0.5)), ("b", (0.6, 0.7))) for s, a in enumerate(values)]
    table = aggregate(rows, ["arm"], ["acc", "best_acc", "delta_acc", "nll"])
    study = StudyConfig(study="s", base="b.yaml", axes={"arm": ["ref", "b"]}, collect=["acc:max", "nll"], primary="acc")
    lines = _primary_lines(study, table, ["acc", "best_acc", "delta_acc", "nll"])
    assert lines[0].startswith("**Primary metric: `acc`**")
    assert lines[2] == "| arm | acc | best_acc | delta_acc |"
    assert lines[5].startswith("| b | 0.65 ± 0.071 (n=2) | 0.66 ± 0.071 (n=2) | 0.15 ± 0.071 (n=2) [")


def test_an_unknown_primary_metric_is_a_one_line_error(tmp_path):
    from workbench.errors import ConfigError
    from workbench.study import StudyConfig
    from workbench.study.checks import check_references

    study = StudyConfig(study="s", base="b.yaml", axes={"arm": ["a", "b"]}, collect=["eval_loss"], primary="acc")
    with pytest.raises(ConfigError, match="field 'primary': 'acc' is not a column"):
        check_references(study, tmp_path / "s.yaml")
