"""The study table's statistics: paired deltas' 95% intervals and evaluator scores at the best validation step."""

from __future__ import annotations

import json
import math
import random

import pytest
from scipy import stats

from workbench.study.collect import aggregate, eval_scores_at_best_validation, t_interval
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
