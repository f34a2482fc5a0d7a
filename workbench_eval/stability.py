"""Signal stability across checkpoints and base/instruct ranking consistency, BOSE style.

Reference: "BOSE: A Systematic Evaluation Method Optimized for Base Models" (Findings of ACL 2025).
BOSE judges an evaluation setup (prompt style ``M`` on benchmark ``b``) by two rank statistics, both
Kendall's tau-b (the variant that corrects for ties):

* **Stability** -- one training run with checkpoints at steps ``s_1 < ... < s_T`` and scores ``y_t``:
  ``tau_stab(M, b) = tau_b(s, y)``.  A setup whose score rises steadily with training has tau near 1.
  :func:`stability` reports it for the whole run and for an early window (the first ``early_fraction``
  of the checkpoints, by index), plus descriptive measures: the fraction of adjacent checkpoint pairs
  that improve / tie, the successive-difference variance and the overall variance.
* **Consistency** -- ``M`` base models with scores ``x_m`` and their instruction-tuned counterparts with
  scores ``z_m``: ``tau_cons = tau_b(x, z)`` (:func:`consistency`).

P-values come from :func:`scipy.stats.kendalltau` (``variant="b"``, ``method="auto"``: the exact null
distribution for small samples without ties, the normal approximation otherwise).  Percentile bootstrap
intervals quantify the uncertainty that comes from the finite benchmark (resampling items) or from the
small set of models (resampling model pairs).  Resamples in which tau is undefined (a constant vector)
are dropped; the results report how many were used.

Kendall's tau-b itself (:func:`kendall_tau_b`, the SciPy-free cross-check :func:`tau_b_reference`) lives in
:mod:`workbench.stats`, which the library uses without importing ``workbench_eval``; it is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from workbench.stats import CHUNK_ELEMENTS, kendall_tau_b, tau_b_reference, tau_b_rows, tau_b_undefined_reason

__all__ = [
    "ConsistencyResult",
    "StabilityResult",
    "TauDifference",
    "bootstrap_tau_over_items",
    "consistency",
    "kendall_tau_b",
    "paired_tau_difference",
    "stability",
    "tau_b_reference",
]

# --------------------------------------------------------------------------------------------------
# Validation and bootstrap helpers
# --------------------------------------------------------------------------------------------------


def _check_boot_args(n_boot: int, confidence: float) -> None:
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer; got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1; got {confidence!r}")


def _finite(name: str, a: NDArray) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _steps_1d(steps: ArrayLike) -> NDArray:
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"steps must be 1-D; got shape {s.shape}")
    if s.shape[0] == 0:
        raise ValueError("steps is empty; need at least one checkpoint")
    _finite("steps", s)
    if np.unique(s).shape[0] != s.shape[0]:
        raise ValueError("steps contains duplicate values; each checkpoint needs a distinct step")
    return s


def _item_matrix(name: str, a: ArrayLike, n_rows: int | None = None, rows_name: str = "rows") -> NDArray:
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x items); got shape {m.shape}")
    if n_rows is not None and m.shape[0] != n_rows:
        raise ValueError(f"{name} has {m.shape[0]} rows but there are {n_rows} {rows_name}")
    if m.shape[1] == 0:
        raise ValueError(f"{name} has no items (shape {m.shape})")
    _finite(name, m)
    return m


def _percentile_interval(taus: NDArray, confidence: float) -> tuple[float, float, int]:
    valid = taus[np.isfinite(taus)]
    if valid.shape[0] == 0:
        return math.nan, math.nan, 0
    alpha = 1.0 - confidence
    lo, hi = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi), int(valid.shape[0])


def _resampled_means(rng: np.random.Generator, items: NDArray, n_boot: int) -> NDArray:
    """Row means of ``items`` (R x I) under ``n_boot`` item resamples with replacement; ``(n_boot, R)``.

    Every row (checkpoint / model) uses the same item indices within a resample.
    """
    r, n_items = items.shape
    out = np.empty((n_boot, r))
    chunk = max(1, CHUNK_ELEMENTS // max(1, r * n_items))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n_items, size=(stop - start, n_items))
        out[start:stop] = items[:, idx].mean(axis=-1).T  # (R, c, I) -> (R, c) -> (c, R)
    return out


# --------------------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------------------


def bootstrap_tau_over_items(
    steps: ArrayLike,
    item_scores: ArrayLike,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float, int]:
    """Percentile bootstrap interval for the stability tau, resampling benchmark items.

    ``item_scores[t, i]`` is the score of checkpoint ``t`` on item ``i`` (e.g. 0/1 correctness or F1).
    Each resample draws ``I`` item indices with replacement from ``numpy.random.default_rng(seed)``,
    applies the *same* indices to every checkpoint, recomputes each checkpoint's mean score and computes
    tau-b against ``steps``.  Resamples whose mean vector is constant (tau undefined) are dropped.

    Caveat: resampling adds item noise to every checkpoint mean, so the bootstrap distribution of tau is
    pulled towards 0.  When the point estimate is close to +-1 with many checkpoints, the percentile
    interval can lie slightly inside it (it does not necessarily contain the point estimate); read it
    as "how much tau would move under a different draw of benchmark items".

    Returns:
        ``(ci_low, ci_high, n_boot_used)``; ``(nan, nan, 0)`` if no resample gave a defined tau (or
        ``n_boot == 0`` or fewer than 2 checkpoints).

    Raises:
        ValueError: on malformed ``steps``/``item_scores`` or bad ``n_boot``/``confidence``.
    """
    _check_boot_args(n_boot, confidence)
    s = _steps_1d(steps)
    items = _item_matrix("item_scores", item_scores, s.shape[0], "checkpoints (len(steps))")
    if n_boot == 0 or s.shape[0] < 2:
        return math.nan, math.nan, 0
    rng = np.random.default_rng(seed)
    means = _resampled_means(rng, items, int(n_boot))
    return _percentile_interval(tau_b_rows(s, means), confidence)


NOTE_CONSTANT = "constant"  # the scores do not change across the checkpoints: tau-b is 0/0
NOTE_TOO_FEW = "too few checkpoints"  # fewer than 2 in the run, fewer than EARLY_MIN in the early window
EARLY_MIN = 3  # checkpoints the early window needs for tau_early


def _tau_note(steps: NDArray, scores: NDArray, minimum: int) -> str:
    """Why tau-b of ``steps`` vs ``scores`` is undefined ("" when it is defined); steps are distinct."""
    if steps.shape[0] < minimum:
        return NOTE_TOO_FEW
    return NOTE_CONSTANT if tau_b_undefined_reason(steps, scores) is not None else ""


@dataclass(frozen=True)
class StabilityResult:
    """Output of :func:`stability` (BOSE stability, ``tau_stab(M, b) = tau_b(s, y)``).

    Attributes:
        tau, p_value: tau-b of steps vs. scores over the whole run, and its two-sided p-value.
        tau_early, p_value_early: the same over the first ``n_early`` checkpoints (NaN if ``n_early < 3``).
        n_checkpoints: ``T``.
        n_early: checkpoints in the early window, ``ceil(early_fraction * T)``.
        frac_improving: fraction of the ``T - 1`` adjacent pairs whose score gets strictly better:
            ``y[t+1] > y[t]`` for a higher-is-better metric, ``y[t+1] < y[t]`` for a lower-is-better one.
        frac_ties: fraction of adjacent pairs with ``y[t+1] == y[t]``; the decreasing fraction is
            ``1 - frac_improving - frac_ties``.
        successive_variance: ``sum_t (y[t+1] - y[t])^2 / (2 (T - 1))`` (von Neumann's delta^2 / 2).
        total_variance: sample variance of the scores (``ddof=1``).
        ci_low, ci_high: percentile bootstrap interval for ``tau`` over items (NaN without item scores).
        n_boot_used: bootstrap resamples with a defined tau (0 without item scores).
        higher_is_better: the metric's direction ``frac_improving`` was counted with.  ``tau`` is not
            re-signed: for a lower-is-better metric a steady improvement gives tau near -1.
        tau_note, tau_early_note: why ``tau`` / ``tau_early`` is NaN (:data:`NOTE_CONSTANT` or
            :data:`NOTE_TOO_FEW`); ``""`` when it is defined.
    """

    tau: float
    p_value: float
    tau_early: float
    p_value_early: float
    n_checkpoints: int
    n_early: int
    frac_improving: float
    frac_ties: float
    successive_variance: float
    total_variance: float
    ci_low: float
    ci_high: float
    n_boot_used: int
    higher_is_better: bool = True
    tau_note: str = ""
    tau_early_note: str = ""

    @property
    def variance_ratio(self) -> float:
        """``successive_variance / total_variance`` (von Neumann ratio / 2).

        About 1 when the scores are independent noise around a constant; well below 1 when a smooth
        trend dominates checkpoint-to-checkpoint noise (a stable signal).  NaN if undefined.
        """
        if not self.total_variance > 0.0:
            return math.nan
        return self.successive_variance / self.total_variance


def stability(
    steps: ArrayLike,
    scores: ArrayLike | None,
    *,
    item_scores: ArrayLike | None = None,
    early_fraction: float = 0.3,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    higher_is_better: bool = True,
) -> StabilityResult:
    """BOSE stability of one run: Kendall tau-b between checkpoint steps and scores, plus descriptives.

    Args:
        steps: 1-D training steps of the checkpoints (distinct; any order -- everything is sorted by step).
        scores: 1-D score per checkpoint, aligned with ``steps``.  May be ``None`` when ``item_scores`` is
            given, in which case the per-checkpoint item means are used.
        item_scores: optional ``(T, I)`` per-item scores aligned with ``steps``; enables the bootstrap
            interval of :func:`bootstrap_tau_over_items` (otherwise ``ci_*`` are NaN).
        early_fraction: size of the early window as a fraction of the *checkpoint count* (index order
            after sorting by step, not of the step range): the first ``ceil(early_fraction * T)``
            checkpoints.  ``tau_early`` needs at least :data:`EARLY_MIN` (3) of them, else NaN.
        n_boot, confidence, seed: bootstrap settings (resamples, interval level, ``default_rng`` seed).
        higher_is_better: the metric's direction; a lower-is-better metric (a perplexity) improves when
            it falls, and ``frac_improving`` counts falls.  Tau is reported as computed (not re-signed).

    Adjacent-pair measures are over consecutive checkpoints in step order and ignore step gaps; ties
    count as not improving in ``frac_improving`` and are reported separately in ``frac_ties``.

    Raises:
        ValueError: on mismatched lengths, non-1-D input, duplicate or non-finite steps, non-finite
            scores, a wrongly shaped ``item_scores``, or out-of-range parameters.
    """
    if not 0.0 < early_fraction <= 1.0:
        raise ValueError(f"early_fraction must be in (0, 1]; got {early_fraction!r}")
    _check_boot_args(n_boot, confidence)
    s = _steps_1d(steps)
    t_count = s.shape[0]
    items = None
    if item_scores is not None:
        items = _item_matrix("item_scores", item_scores, t_count, "checkpoints (len(steps))")
    if scores is None:
        if items is None:
            raise ValueError("scores may be None only when item_scores is given")
        y = items.mean(axis=1)
    else:
        y = np.asarray(scores, dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"scores must be 1-D; got shape {y.shape}")
        if y.shape[0] != t_count:
            raise ValueError(
                f"steps and scores must have the same length; got len(steps)={t_count}, "
                f"len(scores)={y.shape[0]}"
            )
        _finite("scores", y)

    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    if items is not None:
        items = items[order]

    tau, p = kendall_tau_b(s, y)
    n_early = min(t_count, max(1, math.ceil(early_fraction * t_count - 1e-9)))
    tau_e, p_e = kendall_tau_b(s[:n_early], y[:n_early]) if n_early >= EARLY_MIN else (math.nan, math.nan)

    if t_count >= 2:
        d = np.diff(y) if higher_is_better else -np.diff(y)
        frac_imp = float(np.mean(d > 0))
        frac_ties = float(np.mean(d == 0))
        succ_var = float(np.sum(d * d) / (2.0 * (t_count - 1)))
        tot_var = float(np.var(y, ddof=1))
    else:
        frac_imp = frac_ties = succ_var = tot_var = math.nan

    if items is not None:
        lo, hi, used = bootstrap_tau_over_items(s, items, n_boot=n_boot, confidence=confidence, seed=seed)
    else:
        lo, hi, used = math.nan, math.nan, 0

    return StabilityResult(
        tau=tau,
        p_value=p,
        tau_early=tau_e,
        p_value_early=p_e,
        n_checkpoints=t_count,
        n_early=n_early,
        frac_improving=frac_imp,
        frac_ties=frac_ties,
        successive_variance=succ_var,
        total_variance=tot_var,
        ci_low=lo,
        ci_high=hi,
        n_boot_used=used,
        higher_is_better=higher_is_better,
        tau_note=_tau_note(s, y, 2),
        tau_early_note=_tau_note(s[:n_early], y[:n_early], EARLY_MIN),
    )


# --------------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsistencyResult:
    """Output of :func:`consistency` (BOSE consistency, ``tau_cons = tau_b(x, z)``).

    Attributes:
        tau, p_value: tau-b between base-model and instruct-model scores, and its two-sided p-value.
        n_models: number of (base, instruct) pairs ``M``.
        ci_low, ci_high: percentile bootstrap interval for ``tau``.
        n_boot_used: resamples with a defined tau (degenerate resamples are dropped).
        resample: what the bootstrap resampled: ``"models"`` (pairs) or ``"items"``.
    """

    tau: float
    p_value: float
    n_models: int
    ci_low: float
    ci_high: float
    n_boot_used: int
    resample: str = "models"


def consistency(
    base_scores: ArrayLike | None,
    instruct_scores: ArrayLike | None,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    resample: Literal["models", "items"] = "models",
    base_item_scores: ArrayLike | None = None,
    instruct_item_scores: ArrayLike | None = None,
    paired_items: bool = True,
) -> ConsistencyResult:
    """BOSE consistency: Kendall tau-b between base-model scores ``x_m`` and instruct-model scores ``z_m``.

    ``base_scores[m]`` and ``instruct_scores[m]`` must belong to the same model family ``m``.

    Bootstrap (percentile interval, ``numpy.random.default_rng(seed)``):

    * ``resample="models"`` (default): draw ``M`` (x_m, z_m) pairs with replacement.  With few models
      this is the dominant source of uncertainty; duplicated pairs create ties, which tau-b handles.
    * ``resample="items"``: needs ``base_item_scores`` (M x I) and ``instruct_item_scores`` (M x J);
      resamples benchmark items and recomputes every model's mean.  With ``paired_items=True`` (requires
      ``I == J``; column ``i`` is the same item in both) the same indices are used for both matrices,
      otherwise base and instruct items are resampled independently.

    ``base_scores``/``instruct_scores`` may be ``None`` when the corresponding item matrix is given
    (its row means are then used).  Resamples with a constant vector (tau undefined) are dropped.

    Raises:
        ValueError: on shape mismatches (message names both sizes), non-finite values, or bad options.
    """
    _check_boot_args(n_boot, confidence)
    if resample not in ("models", "items"):
        raise ValueError(f"resample must be 'models' or 'items'; got {resample!r}")
    b_items = None if base_item_scores is None else _item_matrix("base_item_scores", base_item_scores)
    i_items = (
        None if instruct_item_scores is None else _item_matrix("instruct_item_scores", instruct_item_scores)
    )

    def _vector(name: str, v: ArrayLike | None, items: NDArray | None) -> NDArray:
        if v is None:
            if items is None:
                raise ValueError(f"{name} may be None only when the matching item-score matrix is given")
            return items.mean(axis=1)
        a = np.asarray(v, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
        _finite(name, a)
        return a

    x = _vector("base_scores", base_scores, b_items)
    z = _vector("instruct_scores", instruct_scores, i_items)
    if x.shape[0] != z.shape[0]:
        raise ValueError(
            "base_scores and instruct_scores must have one entry per model family; got "
            f"{x.shape[0]} base and {z.shape[0]} instruct scores"
        )
    m = x.shape[0]
    for name, items in (("base_item_scores", b_items), ("instruct_item_scores", i_items)):
        if items is not None and items.shape[0] != m:
            raise ValueError(f"{name} has {items.shape[0]} rows but there are {m} models")

    tau, p = kendall_tau_b(x, z)

    rng = np.random.default_rng(seed)
    if n_boot == 0 or m < 2:
        lo, hi, used = math.nan, math.nan, 0
    elif resample == "models":
        idx = rng.integers(0, m, size=(int(n_boot), m))
        lo, hi, used = _percentile_interval(tau_b_rows(x[idx], z[idx]), confidence)
    else:
        if b_items is None or i_items is None:
            raise ValueError("resample='items' needs both base_item_scores and instruct_item_scores")
        if paired_items:
            if b_items.shape[1] != i_items.shape[1]:
                raise ValueError(
                    "paired_items=True needs the same items for base and instruct models; got "
                    f"{b_items.shape[1]} base items and {i_items.shape[1]} instruct items"
                )
            both = np.concatenate([b_items, i_items], axis=0)
            means = _resampled_means(rng, both, int(n_boot))
            xb, zb = means[:, :m], means[:, m:]
        else:
            xb = _resampled_means(rng, b_items, int(n_boot))
            zb = _resampled_means(rng, i_items, int(n_boot))
        lo, hi, used = _percentile_interval(tau_b_rows(xb, zb), confidence)

    return ConsistencyResult(
        tau=tau, p_value=p, n_models=m, ci_low=lo, ci_high=hi, n_boot_used=used, resample=resample
    )


@dataclass(frozen=True)
class TauDifference:
    """tau_b(a, z) − tau_b(b, z) over the same models, with a paired bootstrap interval over models."""

    tau_a: float
    tau_b: float
    difference: float
    ci_low: float
    ci_high: float
    n_boot_used: int


def paired_tau_difference(scores_a: ArrayLike, scores_b: ArrayLike, target: ArrayLike, *, n_boot: int = 2000,
                          confidence: float = 0.95, seed: int | None = 0) -> TauDifference:
    """How much better style `a` ranks the models the way `target` does than style `b` (BOSE consistency:
    `target` is the instruct models' scores): tau_b(a, target) − tau_b(b, target). Each bootstrap resample draws
    the models once, with replacement, and computes both taus on that same draw (a paired bootstrap); resamples
    where either tau is undefined are dropped; percentile interval."""
    _check_boot_args(n_boot, confidence)
    a, b, z = (np.asarray(v, dtype=np.float64) for v in (scores_a, scores_b, target))
    if not a.shape == b.shape == z.shape or a.ndim != 1:
        raise ValueError(f"scores_a, scores_b and target must be 1-D of one length; got {a.shape}, {b.shape}, {z.shape}")
    for name, v in (("scores_a", a), ("scores_b", b), ("target", z)):
        _finite(name, v)
    tau_a, tau_b = kendall_tau_b(a, z)[0], kendall_tau_b(b, z)[0]
    idx = np.random.default_rng(seed).integers(0, a.size, size=(int(n_boot), a.size))
    lo, hi, used = _percentile_interval(tau_b_rows(a[idx], z[idx]) - tau_b_rows(b[idx], z[idx]), confidence)
    return TauDifference(tau_a, tau_b, tau_a - tau_b, lo, hi, used)
