"""Interval helpers for the desiderata: cluster bootstrap intervals (scipy.stats.bootstrap) over inputs.

Every desideratum's items are grouped by input (an input contributes several items: one per ablated
modality, explained modality, draw); resampling whole inputs keeps the items of one input together,
so an interval reflects the number of inputs, not of items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def cluster_bootstrap(
    clusters: Sequence[int],
    statistic: Callable[[np.ndarray], float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 999,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high): ``statistic(mask_counts)`` on every input and its percentile bootstrap
    interval, resampling inputs with replacement.

    Args:
        clusters: the distinct input ids.
        statistic: Int[n_clusters] (how often each input is drawn) -> a number; it weights each
            input's items by that count.
    """
    ids = np.asarray(clusters)
    estimate = float(statistic(np.ones(len(ids), dtype=int)))
    if len(ids) < 2 or not np.isfinite(estimate):
        return estimate, float("nan"), float("nan")

    def resampled(index: np.ndarray) -> float:
        return float(statistic(np.bincount(index.astype(int), minlength=len(ids))))

    result = stats.bootstrap(
        (np.arange(len(ids)),),
        resampled,
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return estimate, float(result.confidence_interval.low), float(result.confidence_interval.high)


def weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` with each item repeated ``weights`` times: NaN
    when ``x`` is constant, 0 when ``y`` is (it does not track ``x`` at all)."""
    keep = weights > 0
    x, y = np.repeat(x[keep], weights[keep]), np.repeat(y[keep], weights[keep])
    if len(x) < 3 or np.ptp(x) == 0:
        return float("nan")
    if np.ptp(y) == 0:
        return 0.0
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """The mean of ``values`` with each repeated ``weights`` times."""
    total = weights.sum()
    return float((values * weights).sum() / total) if total else float("nan")


def per_item(counts: np.ndarray, item_cluster: np.ndarray) -> np.ndarray:
    """Int[n_items]: each item's weight, its input's draw count."""
    return counts[item_cluster]


__all__ = ["cluster_bootstrap", "per_item", "weighted_mean", "weighted_spearman"]
