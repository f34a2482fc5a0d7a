"""Tests for workbench_eval.stability (BOSE-style stability / consistency with Kendall's tau-b)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from workbench.stats import tau_b_rows, tau_b_undefined_reason
from workbench_eval.stability import (
    NOTE_CONSTANT,
    NOTE_TOO_FEW,
    ConsistencyResult,
    StabilityResult,
    bootstrap_tau_over_items,
    consistency,
    kendall_tau_b,
    stability,
    tau_b_reference,
)


def _noisy_increasing_items(t: int = 10, n_items: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.linspace(0.3, 0.7, t)
    items = (rng.random((t, n_items)) < p[:, None]).astype(float)
    return np.arange(t) * 100.0, items


# ---------------------------------------------------------------------------------------- tau-b


def test_textbook_example_tau_is_0_6():
    x, y = [1, 2, 3, 4, 5], [1, 3, 2, 5, 4]  # 8 concordant, 2 discordant, no ties
    tau, p = kendall_tau_b(x, y)
    assert tau == pytest.approx(0.6, abs=1e-15)
    assert 0.0 < p < 1.0
    assert tau_b_reference(x, y) == pytest.approx(0.6, abs=1e-15)
    assert stats.kendalltau(x, y, variant="b").statistic == pytest.approx(0.6, abs=1e-15)


def test_reference_matches_scipy_with_ties():
    rng = np.random.default_rng(123)
    for _ in range(200):
        n = int(rng.integers(5, 31))
        x = rng.integers(0, 5, n)
        y = rng.integers(0, 5, n)
        if np.all(x == x[0]) or np.all(y == y[0]):
            continue
        expected = stats.kendalltau(x, y, variant="b").statistic
        assert tau_b_reference(x, y) == pytest.approx(expected, abs=1e-12)
        assert kendall_tau_b(x, y)[0] == pytest.approx(expected, abs=1e-12)


def test_vectorised_rows_match_scipy():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 4, (50, 12)).astype(float)
    y = rng.integers(0, 4, (50, 12)).astype(float)
    got = tau_b_rows(x, y)
    for b in range(50):
        exp = tau_b_reference(x[b], y[b])
        if math.isnan(exp):
            assert math.isnan(got[b])
        else:
            assert got[b] == pytest.approx(exp, abs=1e-12)
    shared = tau_b_rows(np.arange(12.0), y)
    for b in range(50):
        exp = tau_b_reference(np.arange(12.0), y[b])
        assert (math.isnan(exp) and math.isnan(shared[b])) or shared[b] == pytest.approx(exp, abs=1e-12)


def test_degenerate_tau_is_nan():
    assert all(math.isnan(v) for v in kendall_tau_b([1.0], [2.0]))
    assert all(math.isnan(v) for v in kendall_tau_b([1, 2, 3], [4, 4, 4]))
    assert math.isnan(tau_b_reference([1, 2, 3], [4, 4, 4]))
    assert math.isnan(tau_b_reference([1], [1]))
    with pytest.raises(ValueError, match="same length"):
        kendall_tau_b([1, 2], [1, 2, 3])
    assert tau_b_undefined_reason([1.0], [2.0]) == "fewer than 2 points"
    assert tau_b_undefined_reason([1, 2, 3], [4, 4, 4]) == "y is constant"
    assert tau_b_undefined_reason([1, 2, 3], [4, 5, 4]) is None


def test_library_stats_module_does_not_import_the_evaluator():
    import subprocess
    import sys

    code = "import sys, workbench.stats; print(any(m == 'workbench_eval' or m.startswith('workbench_eval.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import workbench.stats
    import workbench_eval.stability

    assert workbench_eval.stability.kendall_tau_b is workbench.stats.kendall_tau_b  # one implementation, re-exported


# ------------------------------------------------------------------------------------ stability


def test_increasing_and_reversed_sequences():
    steps = np.arange(10) * 1000
    up = stability(steps, np.linspace(0.1, 0.9, 10))
    assert isinstance(up, StabilityResult)
    assert up.tau == pytest.approx(1.0)
    assert up.tau_early == pytest.approx(1.0)
    assert up.n_early == 3 and up.n_checkpoints == 10
    assert up.frac_improving == 1.0 and up.frac_ties == 0.0
    assert math.isnan(up.ci_low) and math.isnan(up.ci_high) and up.n_boot_used == 0
    down = stability(steps, np.linspace(0.9, 0.1, 10))
    assert down.tau == pytest.approx(-1.0)
    assert down.tau_early == pytest.approx(-1.0)
    assert down.frac_improving == 0.0


def test_hand_computed_small_example():
    # diffs: +0.2, 0, -0.1, +0.3 -> 2/4 improving, 1/4 tied
    # successive variance = (0.04 + 0 + 0.01 + 0.09) / (2 * 4) = 0.0175
    # total variance: mean 0.28, squared deviations sum 0.088, / 4 = 0.022
    # tau-b: C=7, D=2, one tie in y -> 5 / sqrt(10 * 9)
    y = [0.1, 0.3, 0.3, 0.2, 0.5]
    r = stability([0, 1, 2, 3, 4], y)
    assert r.frac_improving == pytest.approx(0.5)
    assert r.frac_ties == pytest.approx(0.25)
    assert r.successive_variance == pytest.approx(0.0175)
    assert r.total_variance == pytest.approx(0.022)
    assert r.variance_ratio == pytest.approx(0.0175 / 0.022)
    assert r.tau == pytest.approx(5 / math.sqrt(90))
    # early window: ceil(0.3 * 5) = 2 points < 3 -> NaN
    assert r.n_early == 2 and math.isnan(r.tau_early) and math.isnan(r.p_value_early)
    # order of input does not matter: results are computed in step order
    perm = [3, 0, 4, 2, 1]
    shuffled = stability(np.array([0, 1, 2, 3, 4])[perm], np.array(y)[perm])
    assert shuffled == r


def test_lower_is_better_metric_that_falls_counts_as_improving():
    # the reported case: gold_ppl 11.58 -> 4.68 -> 4.21 falls at every step, so both pairs improve
    ppl = stability([100, 200, 300], [11.58, 4.68, 4.21], higher_is_better=False)
    assert ppl.frac_improving == 1.0 and ppl.frac_ties == 0.0 and not ppl.higher_is_better
    assert ppl.tau == pytest.approx(-1.0)  # tau is not re-signed: it still describes score vs step
    assert stability([100, 200, 300], [11.58, 4.68, 4.21]).frac_improving == 0.0  # read as higher-is-better
    # independent count: pairs with y[t+1] < y[t], ties neither improving nor worsening
    y = [5.0, 4.0, 4.0, 4.5, 3.0, 3.5]
    falls = sum(b < a for a, b in zip(y, y[1:], strict=False)) / (len(y) - 1)
    r = stability(range(len(y)), y, higher_is_better=False)
    assert r.frac_improving == pytest.approx(falls) == pytest.approx(2 / 5)
    assert r.frac_ties == pytest.approx(1 / 5)


def test_undefined_tau_carries_its_reason():
    flat = stability([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.25] * 10)
    assert math.isnan(flat.tau) and flat.tau_note == NOTE_CONSTANT and flat.tau_early_note == NOTE_CONSTANT
    short = stability([1, 2, 3, 4, 5], [0.1, 0.3, 0.3, 0.2, 0.5])  # early window: ceil(0.3 * 5) = 2 < 3
    assert short.tau_note == "" and short.tau_early_note == NOTE_TOO_FEW and math.isnan(short.tau_early)
    one = stability([4], [0.5])
    assert one.tau_note == NOTE_TOO_FEW and math.isnan(one.tau)
    ok = stability(range(10), np.linspace(0, 1, 10))
    assert ok.tau_note == ok.tau_early_note == ""


def test_stability_bad_input():
    with pytest.raises(ValueError, match=r"len\(steps\)=3.*len\(scores\)=4"):
        stability([1, 2, 3], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="duplicate"):
        stability([1, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="early_fraction"):
        stability([1, 2, 3], [0.1, 0.2, 0.3], early_fraction=0.0)
    with pytest.raises(ValueError, match="item_scores has 2 rows"):
        stability([1, 2, 3], [0.1, 0.2, 0.3], item_scores=np.zeros((2, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        stability([1, 2, 3], [0.1, float("nan"), 0.3])


# ------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_deterministic_and_contains_estimate():
    steps, items = _noisy_increasing_items()
    a = bootstrap_tau_over_items(steps, items, n_boot=300, confidence=0.95, seed=42)
    b = bootstrap_tau_over_items(steps, items, n_boot=300, confidence=0.95, seed=42)
    assert a == b
    lo, hi, used = a
    assert used == 300
    r = stability(steps, None, item_scores=items, n_boot=300, seed=42)
    assert (r.ci_low, r.ci_high, r.n_boot_used) == a
    assert lo <= r.tau <= hi
    assert -1.0 <= lo <= hi <= 1.0
    assert lo > 0.0  # a clear upward trend over 400 items


def test_bootstrap_constant_items_gives_nan():
    steps = [0, 10, 20, 30]
    lo, hi, used = bootstrap_tau_over_items(steps, np.ones((4, 20)), n_boot=50, confidence=0.9, seed=0)
    assert math.isnan(lo) and math.isnan(hi) and used == 0
    r = stability(steps, [0.5] * 4, item_scores=np.ones((4, 20)), n_boot=50)
    assert math.isnan(r.tau) and math.isnan(r.ci_low) and r.n_boot_used == 0


# ---------------------------------------------------------------------------------- consistency


def test_consistency_identical_and_reversed():
    base = [0.2, 0.4, 0.5, 0.7, 0.9]
    same = consistency(base, [0.3, 0.45, 0.6, 0.8, 0.95], n_boot=200)
    assert isinstance(same, ConsistencyResult)
    assert same.tau == pytest.approx(1.0) and same.n_models == 5
    assert same.resample == "models"
    assert 0 < same.n_boot_used <= 200 and same.ci_high == pytest.approx(1.0)
    rev = consistency(base, [0.9, 0.8, 0.6, 0.5, 0.1], n_boot=200)
    assert rev.tau == pytest.approx(-1.0)
    assert consistency(base, [0.9, 0.8, 0.6, 0.5, 0.1], n_boot=200, seed=3) == consistency(
        base, [0.9, 0.8, 0.6, 0.5, 0.1], n_boot=200, seed=3
    )


def test_consistency_shape_mismatch():
    with pytest.raises(ValueError, match="4 base and 3 instruct"):
        consistency([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3])


def test_consistency_item_resampling():
    rng = np.random.default_rng(0)
    p = np.array([0.2, 0.4, 0.6, 0.8])
    base = (rng.random((4, 300)) < p[:, None]).astype(float)
    inst = (rng.random((4, 300)) < (p[:, None] + 0.1)).astype(float)
    r = consistency(
        None, None, base_item_scores=base, instruct_item_scores=inst, resample="items", n_boot=200
    )
    assert r.resample == "items" and r.n_boot_used == 200
    assert r.ci_low <= r.tau <= r.ci_high
    r2 = consistency(
        None,
        None,
        base_item_scores=base,
        instruct_item_scores=inst[:, :250],
        resample="items",
        paired_items=False,
        n_boot=100,
    )
    assert r2.n_boot_used == 100
    with pytest.raises(ValueError, match="300 base items and 250 instruct items"):
        consistency(None, None, base_item_scores=base, instruct_item_scores=inst[:, :250], resample="items")


def test_paired_tau_difference_matches_a_scipy_loop_over_the_same_resamples():
    from scipy.stats import kendalltau

    from workbench_eval.stability import paired_tau_difference

    rng = np.random.default_rng(5)
    z = rng.normal(size=9)
    a, b = z + rng.normal(scale=0.3, size=9), rng.normal(size=9)
    result = paired_tau_difference(a, b, z, n_boot=300, seed=11)
    assert result.tau_a == pytest.approx(kendalltau(a, z).statistic)
    assert result.difference == pytest.approx(kendalltau(a, z).statistic - kendalltau(b, z).statistic)
    idx = np.random.default_rng(11).integers(0, 9, size=(300, 9))
    diffs = [kendalltau(a[i], z[i]).statistic - kendalltau(b[i], z[i]).statistic for i in idx]
    diffs = np.array([d for d in diffs if np.isfinite(d)])
    assert (result.ci_low, result.ci_high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    assert result.n_boot_used == diffs.size
    with pytest.raises(ValueError, match="one length"):
        paired_tau_difference(a, b[:5], z)


def test_consistency_rows_rank_each_style_against_instruct_zero_shot_with_a_paired_difference():
    from scipy.stats import kendalltau

    from workbench_eval.consistency import consistency_rows, consistency_table

    rng = np.random.default_rng(3)
    z = rng.normal(size=8)
    styles = {"zero_shot": z + rng.normal(scale=1.0, size=8), "blank_ppl": z + rng.normal(scale=0.2, size=8),
              "letter": np.full(8, 0.25)}
    base = [{("mc", s, "acc"): float(v[m]) for s, v in styles.items()} | {("mc", "zero_shot", "acc_norm"): 0.0}
            for m in range(8)]
    instruct = [{("mc", "zero_shot", "acc"): float(z[m])} for m in range(8)]
    rows = {r["style"]: r for r in consistency_rows(base, instruct, n_boot=200)}
    assert set(rows) == {"blank_ppl", "letter", "zero_shot"}  # acc_norm is not a primary metric
    assert rows["blank_ppl"]["tau"] == pytest.approx(kendalltau(styles["blank_ppl"], z).statistic)
    expected = kendalltau(styles["blank_ppl"], z).statistic - kendalltau(styles["zero_shot"], z).statistic
    assert rows["blank_ppl"]["delta"][0] == pytest.approx(expected)
    assert rows["blank_ppl"]["delta"][1] <= expected <= rows["blank_ppl"]["delta"][2]
    assert rows["zero_shot"]["delta"] is None and math.isnan(rows["letter"]["tau"])
    table = "\n".join(consistency_table(list(rows.values())))
    assert "(reference)" in table and f"{expected:+.2f} [" in table
