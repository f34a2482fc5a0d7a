"""The statistics the library, the evaluator and the reproductions share (NumPy/SciPy only): Kendall's tau-b,
intervals of a mean, paired differences, mean ± sd, correlations.

:func:`kendall_tau_b` is the statistic (SciPy's ``kendalltau(variant="b")`` plus its p-value),
:func:`tau_b_reference` an independent SciPy-free O(n^2) implementation to cross-check it,
:func:`tau_b_rows` the same formula vectorised over many rows (bootstrap resamples), and
:func:`tau_b_undefined_reason` says in words why tau-b is NaN for an input, and
:func:`bootstrap_mean_interval` is a percentile bootstrap interval of a mean (SciPy's ``bootstrap``),
:func:`t_interval` the half-width of a Student-t interval, :func:`paired_difference` the paired comparison
every reproduction reports (mean difference against the reference arm, its 95% interval, and whether the
interval holds zero: "inside the seed spread"), :func:`mean_sd` the mean ± sample standard deviation over seeds
the reproductions' tables print, :func:`paired_test` the paired comparison a reproduction's verdict comes
from (interval, p-value and :func:`minimum_detectable_effect`), :func:`verdict` the fixed rule that turns it
and the paper's effect into one of :data:`VERDICTS`, :func:`holm` Holm's step-down adjustment of a family of
p-values, and :func:`pearson_r` / :func:`spearman_rho` the two correlations of paired
values (SciPy's).

Nothing here imports ``workbench_eval`` (the library must not depend on the evaluator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

__all__ = [
    "CHUNK_ELEMENTS", "VERDICTS", "MeanSD", "PairedDifference", "PairedTest", "bootstrap_mean_interval",
    "holm", "kendall_tau_b", "mean_sd", "minimum_detectable_effect", "paired_difference", "paired_test",
    "pearson_r", "spearman_rho", "t_interval", "tau_b_reference", "tau_b_rows", "tau_b_undefined_reason",
    "verdict",
]  # fmt: skip

# Upper bound on the number of float64 elements a vectorised intermediate may hold (~32 MB).
CHUNK_ELEMENTS = 4_000_000


def _paired_1d(x: ArrayLike, y: ArrayLike, names: tuple[str, str] = ("x", "y")) -> tuple[NDArray, NDArray]:
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"{names[0]} and {names[1]} must be 1-D; got shapes {xa.shape} and {ya.shape}")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length; got {xa.shape[0]} and {ya.shape[0]}"
        )
    return xa, ya


def tau_b_undefined_reason(x: ArrayLike, y: ArrayLike) -> str | None:
    """Why :func:`kendall_tau_b` returns NaN for ``(x, y)``, in words; None when tau-b is defined.

    The reasons, checked in this order: ``"fewer than 2 points"``, ``"non-finite values"``,
    ``"x is constant"``, ``"y is constant"`` (tau-b is 0/0 for a constant input).

    Raises:
        ValueError: if the inputs are not 1-D or differ in length.
    """
    xa, ya = _paired_1d(x, y)
    if xa.shape[0] < 2:
        return "fewer than 2 points"
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        return "non-finite values"
    if np.all(xa == xa[0]):
        return "x is constant"
    if np.all(ya == ya[0]):
        return "y is constant"
    return None


def kendall_tau_b(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Kendall's tau-b and its two-sided p-value, via ``scipy.stats.kendalltau(x, y, variant="b")``.

    ``method="auto"``: the exact null distribution for small samples without ties, the normal
    approximation otherwise.  Returns ``(nan, nan)`` when there are fewer than 2 points, when either
    input is constant (tau-b is 0/0 there) or when either input contains a non-finite value
    (:func:`tau_b_undefined_reason` names which).

    Raises:
        ValueError: if the inputs are not 1-D or differ in length.
    """
    if tau_b_undefined_reason(x, y) is not None:
        return math.nan, math.nan
    res = stats.kendalltau(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), variant="b")
    return float(res.statistic), float(res.pvalue)


def tau_b_reference(x: ArrayLike, y: ArrayLike) -> float:
    """Independent O(n^2) float64 implementation of Kendall's tau-b (no SciPy).

    ``tau_b = (C - D) / sqrt((n0 - n1) * (n0 - n2))`` where, over all ``n0 = n(n-1)/2`` pairs ``i < j``,
    ``C``/``D`` count concordant/discordant pairs, ``n1`` counts pairs tied in ``x`` and ``n2`` pairs
    tied in ``y`` (a pair tied in both counts in ``n1`` and ``n2``, and in neither ``C`` nor ``D``).
    Returns NaN for fewer than 2 points or a zero denominator (a constant input).
    """
    xa, ya = _paired_1d(x, y)
    n = xa.shape[0]
    if n < 2:
        return math.nan
    c_minus_d = 0.0
    n1 = 0
    n2 = 0
    for i in range(n - 1):
        sx = np.sign(xa[i + 1 :] - xa[i])
        sy = np.sign(ya[i + 1 :] - ya[i])
        c_minus_d += float(np.sum(sx * sy))
        n1 += int(np.count_nonzero(sx == 0))
        n2 += int(np.count_nonzero(sy == 0))
    n0 = n * (n - 1) // 2
    denom = math.sqrt(float(n0 - n1) * float(n0 - n2))
    if denom == 0.0 or math.isnan(c_minus_d):
        return math.nan
    return c_minus_d / denom


def tau_b_rows(x: NDArray, y: NDArray) -> NDArray:
    """Tau-b of each row pair: ``x`` is ``(n,)`` (shared) or ``(B, n)``, ``y`` is ``(B, n)``; returns ``(B,)``.

    Same formula as :func:`tau_b_reference`, vectorised over rows (chunked to bound memory);
    NaN where a row is constant.
    """
    b, n = y.shape
    out = np.full(b, np.nan)
    if n < 2 or b == 0:
        return out
    i0, i1 = np.triu_indices(n, k=1)
    n0 = i0.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // n0)
    for start in range(0, b, chunk):
        stop = min(b, start + chunk)
        xc = x if x.ndim == 1 else x[start:stop]
        sx = np.sign(xc[..., i1] - xc[..., i0])
        sy = np.sign(y[start:stop, i1] - y[start:stop, i0])
        s = np.sum(sx * sy, axis=-1)
        n1 = np.count_nonzero(sx == 0, axis=-1)
        n2 = np.count_nonzero(sy == 0, axis=-1)
        denom = np.sqrt((n0 - n1).astype(np.float64) * (n0 - n2).astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:stop] = np.where(denom > 0, s / np.where(denom > 0, denom, 1.0), np.nan)
    return np.clip(out, -1.0, 1.0)


def bootstrap_mean_interval(values: ArrayLike, confidence: float = 0.95, resamples: int = 10_000,
                            seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (SciPy's `stats.bootstrap`, seeded); NaNs for
    fewer than 2 values. With few values (3 seeds) it is narrow: read it with the values themselves."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return math.nan, math.nan
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = stats.bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def t_interval(values: ArrayLike, confidence: float = 0.95) -> float:
    """Half-width of the two-sided Student-t interval of the mean of `values` (nan below 2 values)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))


@dataclass(frozen=True)
class PairedDifference:
    """The mean of paired differences (arm minus reference, one per seed or model) and its interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def inside_spread(self) -> bool:
        """The interval holds zero: the difference is inside the seed spread."""
        return not (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        """'+0.123 [+0.050, +0.196]', with ', inside the seed spread' when the interval holds zero."""
        if math.isnan(self.mean):
            return "–"
        interval = "" if math.isnan(self.low) else f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return f"{self.mean:+.{digits}f}{interval}" + (", inside the seed spread" if interval and self.inside_spread else "")


def paired_difference(arm: ArrayLike, reference: ArrayLike, confidence: float = 0.95) -> PairedDifference:
    """Paired differences `arm - reference` (same seeds, in the same order; NaN pairs dropped): their mean and
    the Student-t interval of the mean (the t-interval at small n, where a bootstrap is too narrow)."""
    a, r = _paired_1d(arm, reference, ("arm", "reference"))
    diff = (a - r)[np.isfinite(a - r)]
    if diff.size == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    mean = float(diff.mean())
    half = t_interval(diff, confidence)
    return PairedDifference(mean, mean - half, mean + half, int(diff.size))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.80) -> float:
    """The smallest true mean difference a two-sided paired t-test at level `alpha` detects with probability
    `power`, from the standard deviation `sd` of `n` paired differences:
    MDE = (t(1 - alpha/2, n - 1) + t(power, n - 1)) * sd / sqrt(n)  (nan below 2 pairs)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    quantiles = stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(quantiles * sd / math.sqrt(n))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison over seeds: mean difference (arm - reference), its 95% Student-t interval, the
    standard deviation of the differences, the two-sided p-value of the paired t-test and the minimum detectable
    effect at 80% power (:func:`minimum_detectable_effect`)."""

    mean: float
    low: float
    high: float
    sd: float
    n: int
    p_value: float
    mde: float


def paired_test(differences: ArrayLike, confidence: float = 0.95, power: float = 0.80) -> PairedTest:
    """:class:`PairedTest` of paired differences (non-finite ones dropped). With every difference equal the
    interval is that value and the p-value 0 (or 1 where it is 0)."""
    diff = np.asarray(differences, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    n = int(diff.size)
    if n == 0:
        return PairedTest(math.nan, math.nan, math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else math.nan
    half = t_interval(diff, confidence)
    if n < 2:
        p = math.nan
    elif sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return PairedTest(mean, mean - half, mean + half, sd, n, p,
                      minimum_detectable_effect(sd, n, 1 - confidence, power))


# The verdict vocabulary of every reproduction, in the order the rule tries them (:func:`verdict`).
VERDICTS = ("reproduces", "opposite", "no effect at this scale", "underpowered")


def verdict(test: PairedTest, expected: float) -> str:
    """The fixed rule from a paired test and the paper's effect carried to our metric (`expected`, signed: the
    direction the paper reports): *reproduces* where the interval excludes 0 on the side of `expected`;
    *opposite* where it excludes 0 on the other side; *no effect at this scale* where it holds 0 and the
    minimum detectable effect is at most |expected|; *underpowered* otherwise (also with fewer than 2 pairs)."""
    if test.n < 2 or not math.isfinite(test.low):
        return VERDICTS[3]
    if test.low > 0 or test.high < 0:
        return VERDICTS[0] if (test.mean > 0) == (expected > 0) else VERDICTS[1]
    if math.isfinite(test.mde) and test.mde <= abs(expected):
        return VERDICTS[2]
    return VERDICTS[3]


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family (same order as given; NaN stays NaN): the k-th smallest
    of m is multiplied by m - k + 1, made monotone, capped at 1."""
    order = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, p * (len(order) - rank)))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class MeanSD:
    """The mean and sample standard deviation (n - 1 in the denominator) of `n` values: the "mean ± sd over
    seeds" of a table cell. NaN mean and sd where there were no values; sd 0 for one value."""

    mean: float
    sd: float
    n: int

    def text(self, digits: int = 2, sign: bool = True) -> str:
        """'+0.55 ± 0.20' (`sign`: the mean with its sign), '–' where there were no values."""
        if math.isnan(self.mean):
            return "–"
        return f"{self.mean:{'+' if sign else ''}.{digits}f} ± {self.sd:.{digits}f}"


def mean_sd(values: ArrayLike) -> MeanSD:
    """Mean and sample standard deviation of `values` with the NaNs left out (NumPy's `mean` and `std(ddof=1)`)."""
    data = np.asarray(values, dtype=np.float64).ravel()
    data = data[~np.isnan(data)]
    if data.size == 0:
        return MeanSD(math.nan, math.nan, 0)
    return MeanSD(float(np.mean(data)), float(np.std(data, ddof=1)) if data.size > 1 else 0.0, int(data.size))


def pearson_r(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson's correlation coefficient of paired values (`scipy.stats.pearsonr`)."""
    xa, ya = _paired_1d(x, y)
    return float(stats.pearsonr(xa, ya).statistic)


def spearman_rho(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rank correlation of paired values (`scipy.stats.spearmanr`)."""
    xa, ya = _paired_1d(x, y)
    return float(stats.spearmanr(xa, ya).statistic)
