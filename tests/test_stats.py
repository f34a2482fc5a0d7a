"""workbench.stats helpers not covered with the evaluator's stability tests (tests/evals/test_stability.py)."""

from __future__ import annotations

import math

import numpy as np


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
