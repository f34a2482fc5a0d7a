"""workbench.stats helpers not covered with the evaluator's stability tests (tests/evals/test_stability.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest


def test_bootstrap_mean_interval_brackets_the_mean_and_narrows_with_more_values():
    from workbench.stats import bootstrap_mean_interval

    rng = np.random.default_rng(0)
    few, many = rng.normal(1.0, 1.0, 5), rng.normal(1.0, 1.0, 200)
    for values in (few, many):
        low, high = bootstrap_mean_interval(values)
        assert low < values.mean() < high
    assert np.subtract(*bootstrap_mean_interval(many)[::-1]) < np.subtract(*bootstrap_mean_interval(few)[::-1])
    assert bootstrap_mean_interval(few) == bootstrap_mean_interval(few)  # seeded
    assert bootstrap_mean_interval([2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_mean_interval([1.0]))


def test_paired_difference_matches_scipy_t_interval():
    from scipy import stats as sps

    from workbench.stats import paired_difference

    rng = np.random.default_rng(3)
    arm, ref = rng.normal(size=5), rng.normal(size=5)
    result = paired_difference(arm, ref)
    diff = arm - ref
    low, high = sps.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=sps.sem(diff))
    assert (result.mean, result.low, result.high, result.n) == pytest.approx((diff.mean(), low, high, 5))
    assert result.inside_spread == (low <= 0 <= high)
    assert "inside the seed spread" in paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.05]).text()
    assert "inside" not in paired_difference([1.0, 2.0, 3.0], [0.0, 1.1, 1.9]).text()
    nan = paired_difference([1.0, float("nan")], [0.0, 1.0])
    assert nan.n == 1 and np.isnan(nan.low)
