"""Verdicts on the evolution metrics (:mod:`mmlens.methods.evolution`): does one span evolve
less than another, per metric and per layer, and does that survive matched controls?

- :func:`verdicts`: per metric "less", "more", "equivalent" or "inconclusive" from a paired
  per-input bootstrap interval and a TOST with a declared margin (:data:`MARGINS`).
- :func:`per_layer_tests`: per metric and layer, a paired permutation test, Holm-corrected over
  the layers of each metric.
- :func:`against_controls`: a span "evolves less" on a metric only when it does so against the
  reference (e.g. text at other positions) *and* against every matched control in its own slots;
  otherwise the first comparison that fails decides.

Inputs are tidy tables with columns ``input, modality, metric, value`` (and ``layer`` for the
per-layer tests), as in :class:`~mmlens.methods.evolution.Evolution`; several of them can be
concatenated with distinct ``modality`` names (a control run's span renamed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mmlens.methods.evolution import METRICS
from mmlens.metrics import stats

MARGINS: dict[str, float] = {
    "top1_change": 0.05,
    "kl_to_final": 0.5,
    "cosine_to_previous": 0.02,
    "first_final_top1_layer": 1.0,
}
"""Declared equivalence margins (TOST) per metric, in the metric's units: 5 percentage points of
top-1 changes, 0.5 nats of KL, 0.02 of cosine, one layer of first appearance."""

VERDICTS = ("less", "more", "equivalent", "inconclusive")
"""What :func:`verdicts` says of span ``a`` against ``b`` per metric: ``a`` evolves less / more,
the two are equivalent within the margin, or the data cannot tell."""


def _paired(per_input: pd.DataFrame, metric: str, a: str, b: str) -> pd.DataFrame:
    table = per_input[per_input.metric == metric].pivot(index="input", columns="modality", values="value")
    if a not in table or b not in table:
        raise KeyError(f"spans {a!r} and {b!r} must both be present; have {sorted(table.columns)}")
    return table[[a, b]].dropna()


def verdicts(
    per_input: pd.DataFrame,
    a: str,
    b: str,
    *,
    margins: dict[str, float] | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per metric, does span ``a`` evolve less than ``b``? Paired over the inputs that have both.

    ``per_input`` has columns ``input, modality, metric, value`` (:attr:`Evolution.per_input`, or
    several concatenated with distinct ``modality`` names). For each metric the paired difference
    ``a - b`` gets a bootstrap interval (BCa, inputs resampled) and a TOST against ``+-margin``
    (``margins``, default :data:`MARGINS`). The verdict: ``"equivalent"`` when TOST rejects both
    one-sided nulls (even if the interval also excludes zero: the difference is then real but
    smaller than the margin); else ``"less"`` / ``"more"`` when the interval lies wholly on the
    side where ``a`` evolves less / more; else ``"inconclusive"``.

    Returns one row per metric: ``metric, mean_a, mean_b, diff, low, high, margin, tost_p,
    direction, verdict, n_inputs, method``.
    """
    margins = {**MARGINS, **(margins or {})}
    rows = []
    for metric, direction in METRICS.items():
        pair = _paired(per_input, metric, a, b)
        if len(pair) < 2:
            raise ValueError(f"metric {metric!r}: {len(pair)} inputs have both {a!r} and {b!r}; need at least 2")
        x, y = pair[a].to_numpy(), pair[b].to_numpy()
        interval = stats.bootstrap_ci(x, paired_with=y, confidence=confidence, seed=seed)
        margin = margins[metric]
        equivalence = stats.tost(x, y, low=-margin, high=margin, paired=True, alpha=1 - confidence)
        low, high = (interval.low, interval.high) if direction == "lower" else (-interval.high, -interval.low)
        if equivalence.equivalent:
            verdict = "equivalent"
        elif high < 0:
            verdict = "less"
        elif low > 0:
            verdict = "more"
        else:
            verdict = "inconclusive"
        rows.append(
            {
                "metric": metric,
                "mean_a": float(x.mean()),
                "mean_b": float(y.mean()),
                "diff": interval.estimate,
                "low": interval.low,
                "high": interval.high,
                "margin": margin,
                "tost_p": equivalence.p_value,
                "direction": direction,
                "verdict": verdict,
                "n_inputs": len(pair),
                "method": f"{interval.method}; {equivalence.method}",
            }
        )
    return pd.DataFrame(rows)


def holm(p_values: list[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction of [k] p-values: (reject Bool[k], adjusted p-values Float[k]).
    The same numbers as :func:`mmlens.metrics.stats.holm`, without statsmodels' per-call
    ``gc.collect()`` (about 1.5 s each in a process holding a model; this runs hundreds of times)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted <= alpha, adjusted


def per_layer_tests(
    per_layer: pd.DataFrame, a: str, b: str, *, alpha: float = 0.05, n_resamples: int = 1999, seed: int = 0
) -> pd.DataFrame:
    """Per metric and layer: span ``a`` against ``b``, paired over inputs (a permutation test that
    swaps ``a`` and ``b`` within each input), Holm-corrected over the layers of each metric.

    ``per_layer``: columns ``input, modality, metric, layer, value``. Returns one row per (metric,
    layer): ``metric, layer, mean_a, mean_b, diff, p_value, p_holm, significant, a_evolves_less``
    (significant and on the "evolves less" side of the metric).
    """
    rows = []
    for metric, direction in METRICS.items():
        sub = per_layer[per_layer.metric == metric]
        if sub.empty:
            continue
        table = sub.pivot_table(index=["layer", "input"], columns="modality", values="value")
        if a not in table or b not in table:
            raise KeyError(f"spans {a!r} and {b!r} must both be present; have {sorted(table.columns)}")
        found = []
        for layer, group in table[[a, b]].dropna().groupby(level="layer"):
            x, y = group[a].to_numpy(), group[b].to_numpy()
            if len(x) < 2 or np.ptp(x - y) == 0 and (x - y)[0] == 0:
                p = 1.0
            else:
                p = stats.permutation_test(x, y, kind="samples", n_resamples=n_resamples, seed=seed).p_value
            found.append({"metric": metric, "layer": int(layer), "mean_a": x.mean(), "mean_b": y.mean(), "p_value": p})
        if not found:
            continue
        reject, adjusted = holm([r["p_value"] for r in found], alpha)
        for r, sig, p_holm in zip(found, reject, adjusted):
            diff = float(r["mean_a"] - r["mean_b"])
            less = diff < 0 if direction == "lower" else diff > 0
            rows.append({**r, "diff": diff, "p_holm": float(p_holm), "significant": bool(sig)})
            rows[-1]["a_evolves_less"] = bool(sig and less)
    return pd.DataFrame(rows)


def span_verdict(
    per_input: pd.DataFrame,
    per_layer: pd.DataFrame,
    span: str,
    controls: Sequence[str],
    *,
    seed: int = 0,
    n_resamples: int = 999,
) -> dict:
    """Whether ``span`` evolves less than text tokens and than every matched control (the TEA-GLM
    rule, for any span name): :func:`verdicts` against ``"text"`` and each of ``controls`` (in that
    order), combined by :func:`against_controls`, with per-layer Holm tests; the claim holds when at
    least 3 of the 4 metrics read "less" and none "more". Returns a JSON-ready dict: ``comparisons``,
    ``verdict``, ``per_layer_tests``, ``metrics_less``, ``metrics_more``, ``claim_reproduced``,
    ``deciding_comparison``, ``margins``."""
    reference = verdicts(per_input, span, "text", seed=seed)
    matched = {c: verdicts(per_input, span, c, seed=seed) for c in controls}
    combined = against_controls(reference, matched, "text")
    layer_tests = {
        b: per_layer_tests(per_layer, span, b, n_resamples=n_resamples, seed=seed).to_dict(orient="records")
        for b in ("text", *matched)
    }
    n_less, n_more = int((combined.verdict == "less").sum()), int((combined.verdict == "more").sum())
    return {
        "comparisons": {"text": reference.to_dict(orient="records")}
        | {c: t.to_dict(orient="records") for c, t in matched.items()},
        "verdict": combined.to_dict(orient="records"),
        "per_layer_tests": layer_tests,
        "metrics_less": n_less,
        "metrics_more": n_more,
        "claim_reproduced": n_less >= 3 and n_more == 0,
        "deciding_comparison": f"{span} vs {combined.deciding.value_counts().idxmax()}",
        "margins": MARGINS,
    }


def layer_bands(tests: Mapping[str, pd.DataFrame | list[dict]]) -> pd.DataFrame:
    """Layers where span ``a`` differs significantly from EVERY comparison in ``tests`` (name ->
    :func:`per_layer_tests` table or its records) in the same direction: columns ``metric, layer,
    band`` with ``band`` "less" (evolves less than all of them) or "more" (than all of them)."""
    tables = [pd.DataFrame(t) for t in tests.values()]
    if not tables or any(t.empty for t in tables):
        return pd.DataFrame(columns=["metric", "layer", "band"])
    side = [
        t.set_index(["metric", "layer"]).apply(
            lambda r: "less" if r.a_evolves_less else ("more" if r.significant else ""), axis=1
        )
        for t in tables
    ]
    joined = pd.concat(side, axis=1, join="inner")
    agreed = joined[(joined.nunique(axis=1) == 1) & (joined.iloc[:, 0] != "")].iloc[:, 0]
    return agreed.rename("band").reset_index()


def against_controls(reference: pd.DataFrame, controls: dict[str, pd.DataFrame], reference_name: str) -> pd.DataFrame:
    """Combine :func:`verdicts` tables of one span against a reference and against matched controls.

    A metric reads "less" only when every comparison (the reference's and each control's) reads
    "less"; otherwise it takes the verdict of the first comparison that does not, in the order
    reference, then ``controls`` in insertion order, and ``deciding`` names that comparison (the
    last one checked when all read "less"). Returns ``metric, verdict, deciding`` and one column
    per comparison with its verdict.
    """
    tables = {reference_name: reference, **controls}
    rows = []
    for metric in METRICS:
        each = {name: str(t.set_index("metric").loc[metric, "verdict"]) for name, t in tables.items()}
        failing = next((name for name, v in each.items() if v != "less"), None)
        deciding = failing if failing is not None else list(each)[-1]
        rows.append({"metric": metric, "verdict": each[deciding], "deciding": deciding, **each})
    return pd.DataFrame(rows)
