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


def test_mean_sd_is_numpys_mean_and_sample_sd_without_the_nans():
    from workbench.stats import mean_sd

    values = [0.2, float("nan"), 0.5, 0.9]
    result = mean_sd(values)
    assert (result.mean, result.sd, result.n) == (np.mean([0.2, 0.5, 0.9]), np.std([0.2, 0.5, 0.9], ddof=1), 3)
    assert result.text(2) == "+0.53 ± 0.35" and result.text(3, sign=False) == "0.533 ± 0.351"
    assert (mean_sd([0.25]).sd, mean_sd([0.25]).text()) == (0.0, "+0.25 ± 0.00")
    for empty in ([], [float("nan")]):
        assert mean_sd(empty).n == 0 and math.isnan(mean_sd(empty).mean) and mean_sd(empty).text() == "–"


def test_pearson_and_spearman_are_scipys():
    from scipy import stats as sps

    from workbench.stats import pearson_r, spearman_rho

    rng = np.random.default_rng(5)
    x = rng.normal(size=20)
    y = x + rng.normal(size=20)
    assert pearson_r(list(x), list(y)) == sps.pearsonr(x, y).statistic
    assert spearman_rho(list(x), list(y)) == sps.spearmanr(x, y).statistic
    with pytest.raises(ValueError, match="same length"):
        pearson_r([1.0, 2.0], [1.0])
