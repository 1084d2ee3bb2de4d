"""Cluster bootstrap intervals over inputs (``scipy.stats.bootstrap``), for statistics of items grouped by input.

A desideratum's items are grouped by input (an input contributes one item per ablated modality,
explained modality, draw), so resampling must draw whole inputs: an interval then reflects the
number of inputs, not of items. :mod:`mmlens.metrics.stats` covers one value per input
(``bootstrap_ci``); this module covers the grouped case. A statistic receives, for a batch of
resamples, how often each input was drawn (Int[R, n_inputs]) and weighs each input's items by it,
so every resample is one vectorised evaluation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def cluster_bootstrap(
    clusters: Sequence[int],
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    confidence: float = 0.95,
    n_resamples: int = 999,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic on every input once and its percentile bootstrap interval
    over inputs drawn with replacement (NaN bounds for fewer than 2 inputs or a NaN estimate).

    Args:
        clusters: the distinct input ids (n of them).
        statistic: Int[R, n] draw counts per resample -> Float[R].
    """
    n = len(clusters)
    estimate = float(statistic(np.ones((1, n), dtype=np.int64))[0])
    if n < 2 or not np.isfinite(estimate):
        return estimate, float("nan"), float("nan")

    def resampled(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.moveaxis(index, axis, -1).reshape(-1, n).astype(np.int64)
        counts = np.zeros((len(index), n), dtype=np.int64)
        np.add.at(counts, (np.arange(len(index))[:, None], index), 1)
        return statistic(counts)

    with warnings.catch_warnings():  # a degenerate resample distribution (few inputs) gives a point interval
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            (np.arange(n),),
            resampled,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            batch=256,
            rng=np.random.default_rng(seed),
        )
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Float[R, n]: the mid-ranks of ``values`` [n] in the sample where item j appears ``weights[r, j]``
    times (ties share their mean rank), as ``scipy.stats.rankdata`` of the repeated sample gives."""
    _, group = np.unique(values, return_inverse=True)
    per_group = np.zeros((weights.shape[0], group.max() + 1))
    np.add.at(per_group, (slice(None), group), weights)
    below = np.cumsum(per_group, axis=1) - per_group
    return (below + (per_group + 1) / 2)[:, group]


def weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Float[R]: Spearman's rank correlation of ``x`` and ``y`` [n] with item j repeated ``weights[r, j]``
    times: NaN when ``x`` is constant (or fewer than 3 items), 0 when ``y`` is (it tracks nothing)."""
    w = np.atleast_2d(weights).astype(float)
    rx, ry = weighted_ranks(x, w), weighted_ranks(y, w)
    total = w.sum(1)
    mx, my = (w * rx).sum(1) / total, (w * ry).sum(1) / total
    dx, dy = rx - mx[:, None], ry - my[:, None]
    sxx, syy, sxy = (w * dx * dx).sum(1), (w * dy * dy).sum(1), (w * dx * dy).sum(1)
    out = np.where(syy > 0, sxy / np.sqrt(np.maximum(sxx * syy, 1e-300)), 0.0)
    return np.where((sxx > 0) & (total >= 3), out, np.nan)


def weighted_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, R^2), each Float[R]: weighted least squares y ~ a + b x (NaN when x is constant)."""
    w = np.atleast_2d(weights).astype(float)
    total = w.sum(1)
    mx, my = (w * x).sum(1) / total, (w * y).sum(1) / total
    dx, dy = x[None] - mx[:, None], y[None] - my[:, None]
    sxx, syy, sxy = (w * dx * dx).sum(1), (w * dy * dy).sum(1), (w * dx * dy).sum(1)
    ok = (sxx > 0) & (total >= 3)
    slope = np.where(ok, sxy / np.where(ok, sxx, 1.0), np.nan)
    r2 = np.where(ok & (syy > 0), sxy**2 / np.maximum(sxx * syy, 1e-300), np.nan)
    return slope, r2


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Float[R]: the mean of ``values`` [n] with item j repeated ``weights[r, j]`` times."""
    w = np.atleast_2d(weights).astype(float)
    return (w * values).sum(1) / np.maximum(w.sum(1), 1e-300)


__all__ = ["cluster_bootstrap", "weighted_fit", "weighted_mean", "weighted_ranks", "weighted_spearman"]
