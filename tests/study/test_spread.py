"""`collect: key:spread` (variance and oscillation over checkpoints) and curve plots of evaluator columns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.study.collect import spread
from workbench.study.report import curve_points


def test_spread_is_the_sample_variance_and_half_the_mean_squared_step():
    values = [0.3, 0.5, 0.2, 0.6, 0.55]
    got = spread("k", values)
    assert got["var@k"] == pytest.approx(np.var(values, ddof=1))
    assert got["osc@k"] == pytest.approx(np.mean(np.diff(values) ** 2) / 2)
    assert spread("k", [1.0, 2.0]) == {}  # too few checkpoints


def test_oscillation_ignores_a_smooth_trend_that_variance_counts():
    trend = list(np.linspace(0, 10, 11))
    got = spread("k", trend)
    assert got["var@k"] > 10 and got["osc@k"] == pytest.approx(0.5) and got["res@k"] == pytest.approx(0.0, abs=1e-12)


def test_residual_variance_is_that_of_a_least_squares_line_fit():
    rng = np.random.default_rng(0)
    steps = np.arange(20, 220, 20, dtype=float)
    values = 3.0 - 0.01 * steps + rng.normal(0, 0.1, steps.size)
    fit = np.polyfit(steps, values, 1)
    expected = np.sum((values - np.polyval(fit, steps)) ** 2) / (steps.size - 2)
    got = spread("k", list(values), list(steps))
    assert got["res@k"] == pytest.approx(expected, rel=1e-9)
    assert got["osc@k"] > got["res@k"] * 0.5  # a falling curve still adds to osc@; res@ removes the line exactly


def test_curve_points_of_an_evaluator_column(tmp_path):
    records = [{"step": s, "task": "eigenscore", "style": "completion", "metric": m, "value": v}
               for s, v in ((20, 2.0), (10, 1.0)) for m in ("ees", "entropy")]
    records.append({"step": 30, "status": "skipped", "checkpoint": "checkpoint-30"})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 3.0}) + "\n")
    assert curve_points(tmp_path, "eigenscore.completion.ees") == [(10, 1.0), (20, 2.0)]
    assert curve_points(tmp_path, "loss") == [(5, 3.0)]
