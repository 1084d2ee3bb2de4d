"""Statistics for metrics and verdicts, built on ``scipy.stats`` and ``statsmodels``.

- :func:`bootstrap_ci`: a bootstrap interval of a statistic of one sample, or of the paired
  difference of two samples (``scipy.stats.bootstrap``, BCa by default).
- :func:`permutation_test`: a permutation test of two samples, independent or paired, or of the
  association of paired values (``scipy.stats.permutation_test``).
- :func:`tost`: equivalence within ``[low, high]`` by two one-sided t-tests (``scipy.stats.ttest_*``).
- :func:`holm`: Holm's step-down correction of several p-values (``statsmodels.stats.multitest``).
- :func:`auroc`: the area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)) with a stratified
  bootstrap interval.
- :func:`verdict`: "supported", "refuted" or "inconclusive" from an interval, a null and a claim.

Every function is seeded and returns a small frozen record with the method used, so a result says
which test produced it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

Statistic = Callable[..., np.ndarray | float]
"""``statistic(*samples, axis=-1)``: vectorised over ``axis`` as ``scipy.stats`` expects."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``confidence`` (e.g. 0.95); ``low``/``high``
    are NaN where there are too few values for one (no verdict can rest on it)."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside ``[low, high]``."""
        return bool(value < self.low or value > self.high)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Test:
    """The outcome of a hypothesis test: its statistic, p-value and method."""

    statistic: float
    p_value: float
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Equivalence:
    """TOST: ``p_value`` is the larger of the two one-sided p-values; equivalent when < ``alpha``."""

    difference: float
    low: float
    high: float
    p_lower: float
    p_upper: float
    p_value: float
    alpha: float
    equivalent: bool
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def _sample(x: ArrayLike, name: str, minimum: int = 2) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if a.size < minimum:
        raise ValueError(f"{name} has {a.size} values; give at least {minimum}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values ({int((~np.isfinite(a)).sum())} of {a.size}); drop them")
    return a


def _constant(a: np.ndarray) -> bool:
    """Whether ``a`` has no spread beyond rounding (t-tests and BCa are undefined there)."""
    return bool(np.ptp(a) <= 1e-9 * max(1.0, float(np.abs(a).max())))


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def bootstrap_ci(
    x: ArrayLike,
    statistic: Statistic = _mean,
    *,
    paired_with: ArrayLike | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    method: Literal["BCa", "percentile", "basic"] = "BCa",
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of ``statistic(x)``, or with ``paired_with=y`` of ``statistic(x - y)``
    (the rows of x and y are resampled together: a paired interval). ``x``: [n] values.

    A sample whose resampled statistics are all equal (e.g. constant values) gets the degenerate
    interval [estimate, estimate]; where BCa is undefined the percentile interval is used and the
    ``method`` field says so."""
    a = _sample(x, "x")
    if paired_with is not None:
        b = _sample(paired_with, "paired_with")
        if b.size != a.size:
            raise ValueError(f"paired_with has {b.size} values, x has {a.size}; pair them one to one")
        a = a - b
    estimate = float(statistic(a, axis=-1))
    label = f"bootstrap {method}{' paired' if paired_with is not None else ''}, {n_resamples} resamples"
    if _constant(a):
        return Interval(estimate, estimate, estimate, confidence, label + " (constant sample)")
    for how in dict.fromkeys([method, "percentile"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sps.DegenerateDataWarning)
            res = sps.bootstrap(
                (a,), statistic, confidence_level=confidence, n_resamples=n_resamples, method=how, rng=seed
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            if how != method:
                label += f" (BCa undefined: {how})"
            return Interval(estimate, low, high, confidence, label)
    return Interval(estimate, estimate, estimate, confidence, label + " (degenerate resamples)")


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def permutation_test(
    x: ArrayLike,
    y: ArrayLike,
    statistic: Statistic = _mean_difference,
    *,
    kind: Literal["independent", "samples", "pairings"] = "independent",
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
    n_resamples: int = 9999,
    seed: int = 0,
) -> Test:
    """Permutation test of ``statistic(x, y)``: ``kind="independent"`` shuffles values between the two
    samples, ``"samples"`` swaps x and y within each pair (paired designs), ``"pairings"`` shuffles the
    pairing (association, e.g. a rank correlation against a truth). ``x``, ``y``: [n] values."""
    a, b = _sample(x, "x"), _sample(y, "y")
    if kind != "independent" and a.size != b.size:
        raise ValueError(f"kind={kind!r} pairs x ({a.size} values) with y ({b.size}); give equal lengths")
    res = sps.permutation_test(
        (a, b),
        statistic,
        permutation_type=kind,
        alternative=alternative,
        n_resamples=n_resamples,
        vectorized=True,
        rng=seed,
    )
    method = f"permutation test ({kind}, {alternative}, {n_resamples} resamples)"
    return Test(float(res.statistic), float(res.pvalue), method)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rank correlation along ``axis`` (vectorised, for :func:`permutation_test`)."""
    rx = sps.rankdata(x, axis=axis)
    ry = sps.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(axis=axis) / np.where(den > 0, den, 1.0), 0.0)


def tost(
    x: ArrayLike, y: ArrayLike | None = None, *, low: float, high: float, paired: bool = False, alpha: float = 0.05
) -> Equivalence:
    """Equivalence test: is mean(x) - mean(y) (or mean(x) with ``y=None``) inside ``[low, high]``?
    Two one-sided t-tests, H0a: diff <= low and H0b: diff >= high; equivalent when both reject at
    ``alpha``. ``paired=True`` tests the differences of paired values (Welch's test otherwise)."""
    if not low < high:
        raise ValueError(f"tost needs low < high, got low={low}, high={high}")
    a = _sample(x, "x")
    if y is None or paired:
        d = a if y is None else a - _sample(y, "y")
        if y is not None and d.size != a.size:
            raise ValueError("paired=True needs x and y of equal length")
        diff = float(d.mean())
        if _constant(d):  # no spread: the t-tests are undefined, the answer is exact
            p_lo, p_hi = float(diff <= low), float(diff >= high)
        else:
            p_lo = float(sps.ttest_1samp(d, low, alternative="greater").pvalue)
            p_hi = float(sps.ttest_1samp(d, high, alternative="less").pvalue)
        method = "TOST, one-sample t-tests" + (" on paired differences" if y is not None else "")
    else:
        b = _sample(y, "y")
        diff = float(a.mean() - b.mean())
        p_lo = float(sps.ttest_ind(a - low, b, equal_var=False, alternative="greater").pvalue)
        p_hi = float(sps.ttest_ind(a - high, b, equal_var=False, alternative="less").pvalue)
        method = "TOST, Welch t-tests"
    p = max(p_lo, p_hi)
    return Equivalence(diff, low, high, p_lo, p_hi, p, alpha, bool(p < alpha), method)


def holm(p_values: Sequence[float] | ArrayLike, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction: (reject [k] bool, adjusted p-values [k])."""
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    if np.any((p < 0) | (p > 1) | ~np.isfinite(p)):
        raise ValueError(f"p_values must lie in [0, 1], got {p.tolist()}")
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return reject, adjusted


def _auc(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    u = sps.mannwhitneyu(pos, neg, axis=axis, alternative="two-sided", method="asymptotic").statistic
    return u / (pos.shape[axis] * neg.shape[axis])


def auc(positive: ArrayLike, negative: ArrayLike) -> float:
    """AUROC of scores separating ``positive`` [n1] from ``negative`` [n0] (ties count one half),
    without an interval; NaN when either is empty."""
    pos, neg = np.asarray(positive, dtype=float).ravel(), np.asarray(negative, dtype=float).ravel()
    return float(_auc(pos, neg)) if pos.size and neg.size else float("nan")


def auroc_difference(
    positive: ArrayLike, negative: ArrayLike, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """AUROC(feature 0) - AUROC(feature 1) of two features measured on the same items:
    ``positive`` Float[2, n1], ``negative`` Float[2, n0]; a stratified bootstrap interval
    (percentile) that resamples items of each class, both features together (paired)."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[0] != 2 or neg.shape[0] != 2:
        raise ValueError(f"positive and negative must be Float[2, n], got {pos.shape} and {neg.shape}")

    def difference(p: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
        return _auc(p[0], n[0], axis) - _auc(p[1], n[1], axis)

    estimate = float(difference(pos, neg))
    label = f"AUROC difference, stratified paired bootstrap percentile, {n_resamples} resamples"
    if pos.shape[1] < 2 or neg.shape[1] < 2:
        return Interval(estimate, float("nan"), float("nan"), confidence, label + " (too few items: no interval)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        res = sps.bootstrap(
            (pos, neg),
            difference,
            confidence_level=confidence,
            n_resamples=n_resamples,
            method="percentile",
            axis=-1,
            rng=seed,
        )
    return Interval(
        estimate, float(res.confidence_interval.low), float(res.confidence_interval.high), confidence, label
    )


def auroc(
    positive: ArrayLike,
    negative: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    method: Literal["BCa", "percentile"] = "percentile",
    seed: int = 0,
) -> Interval:
    """AUROC of scores separating ``positive`` [n1] from ``negative`` [n0] (ties count one half),
    with a bootstrap interval that resamples each class separately."""
    pos, neg = _sample(positive, "positive", 1), _sample(negative, "negative", 1)
    estimate = float(_auc(pos, neg))
    label = f"AUROC (Mann-Whitney U), stratified bootstrap {method}, {n_resamples} resamples"
    if pos.size < 2 or neg.size < 2:
        return Interval(estimate, float("nan"), float("nan"), confidence, label + " (too few values: no interval)")
    if _constant(pos) and _constant(neg):
        return Interval(estimate, estimate, estimate, confidence, label + " (constant scores)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)
        res = sps.bootstrap(
            (pos, neg), _auc, confidence_level=confidence, n_resamples=n_resamples, method=method, rng=seed
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return Interval(estimate, estimate, estimate, confidence, label + " (degenerate resamples)")
    return Interval(estimate, low, high, confidence, label)


Verdict = Literal["supported", "refuted", "inconclusive"]


def verdict(interval: Interval, null: float, *, claim: float | None = None, direction: int = 1) -> Verdict:
    """Decide a claim "statistic > null" (``direction=+1``) or "< null" (``-1``) from its interval:
    "supported" when the interval lies wholly beyond ``null`` on the claim's side; "refuted" when it
    lies wholly on the other side of ``claim`` (the smallest effect that would count; default
    ``null``), i.e. excludes the claim; "inconclusive" otherwise (also for a NaN interval)."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    claim = null if claim is None else claim
    if (claim - null) * direction < 0:
        raise ValueError(f"claim={claim} lies on the wrong side of null={null} for direction={direction}")
    lo, hi = (interval.low, interval.high) if direction == 1 else (-interval.high, -interval.low)
    nl, cl = (null, claim) if direction == 1 else (-null, -claim)
    if lo > nl:
        return "supported"
    if hi < cl:
        return "refuted"
    return "inconclusive"
