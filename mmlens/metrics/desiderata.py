"""The paper's three desiderata of a multimodal explanation, as numbers.

- :func:`granger`: Granger-style modality influence. Replace modality m by its neutral reference,
  measure the output change Delta_m and each explainer's explanation change delta_{m->n} for the
  other modalities n; a faithful explainer's delta grows with Delta (delta >= kappa * Delta - lambda).
- :func:`stability`: unified stability. Lipschitz ratios of the explanation change over the input
  change under small meaning-preserving perturbations, within a modality (Eq. 6) and across
  modalities (Eq. 7).
- :func:`faithfulness`: synergistic faithfulness. Keep only (or remove) the top-k fraction of each
  modality's positions by an explanation, the rest (or those) set to the neutral reference;
  sufficiency gap |f(keep) - f(x)| and necessity drop f(x) - f(remove) as curves over k, with areas,
  against random explanations of the same size. ``level="input"`` does the same on raw input
  units (vision patches, tokens, audio frames, graph nodes and edges; ``Adapter.input_units``).

Every other intervention acts where the modalities enter the LM (``fusion.embeds`` / ``lm.embed``),
so text, image and graph positions are treated alike, and variants are evaluated in batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.core.spans import ModalitySpans
from mmlens.core.units import InputUnits
from mmlens.core.wrapper import HookedModel
from mmlens.methods.explainers import (
    CONTROLS,
    Explainer,
    Explanation,
    check_method,
    explain_rows,
    explainer_name,
    reads_setup_only,
)
from mmlens.methods.patching import Metric
from mmlens.methods.setups import (
    Setup,
    predicted_prob,
    prediction_metric,
    prepare,
    prepare_rows,
    variant_setup,
    with_embeds,
)
from mmlens.methods.variants import CannotRebase, masked_values, masked_values_rows, rebase_rows
from mmlens.metrics.intervals import cluster_bootstrap, weighted_fit, weighted_mean, weighted_spearman
from mmlens.metrics.stats import Interval, bootstrap_ci

EXPLAINED_TOGETHER: int = 8
"""Granger, faithfulness and stability prepare and explain this many inputs (with their ablated or
perturbed variants) together (:func:`mmlens.methods.setups.prepare_rows`,
:func:`~mmlens.methods.explainers.explain_rows`): occlusion's masked variants of all of them share
calls of the LM's blocks. A speed and memory setting only; results do not depend on it beyond float
round-off."""

Dataset = Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""Inputs of several examples: one batch (a row per example), or a list of inputs (each one or more
rows; lengths may differ between them)."""


def examples(hooked: HookedModel, dataset: Dataset) -> list[dict]:
    """The examples of ``dataset`` as a list of batch-1 inputs."""
    batches = [dataset] if isinstance(dataset, Mapping) else list(dataset)
    if not batches:
        raise ValueError("the dataset is empty")
    out = []
    for batch in batches:
        batch = hooked.check_inputs(batch)
        out += [hooked.rows(batch, i) for i in range(hooked.spans(batch).batch_size)]
    return out


def _modalities(hooked: HookedModel, items: list[dict]) -> list[str]:
    found: dict[str, None] = {}
    for x in items:
        found.update(dict.fromkeys(hooked.spans(x).modalities))
    return list(found)


def js_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the softmaxes of Float[b, vocab] logits,
    Double[b]: computed in float64 (a float32 sum over a 49k-token vocabulary is off by ~1e-5)."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(
            -1
        )

    return (kl(p, m) + kl(q, m)) / 2


def explanation_distance(a: Explanation, b: Explanation, modality: str, kind: str = "mass") -> Tensor:
    """Float[b]: how much the explanation of ``modality`` changed from ``a`` to ``b`` (same layout).

    ``"mass"`` (default, magnitude-aware): the mean |s_a - s_b| over the modality's positions in units
    of mean |s_a| + mean |s_b| over all scored positions (0 when unchanged; 1 when a modality holding
    all the mass of ``a`` loses it). It counts a change of attribution mass as well as of shape, is
    invariant to rescaling both explanations by c != 0, does not grow with a modality's position
    count, and a modality holding a sliver of the mass can only move a little.
    ``"tv"``: total variation between the two |score| distributions over the modality's positions
    (in [0, 1]; scale-free: a modality's sliver of mass becomes a full distribution).
    ``"relative_l2"``: ||s_a - s_b|| / ||s_a|| on those positions.
    """
    if kind == "mass":
        mask = a.spans.masks[modality].to(a.scores.device)
        change = (a.masked(modality) - b.masked(modality)).abs().sum(1) / mask.sum(1).clamp_min(1)
        scale = sum(e.scores.nan_to_num().abs().sum(1) / (~e.scores.isnan()).sum(1).clamp_min(1) for e in (a, b))
        return change / scale.clamp_min(1e-30)
    if kind == "tv":
        return (a.distribution(modality) - b.distribution(modality)).abs().sum(1) / 2
    if kind == "relative_l2":
        diff = (a.masked(modality) - b.masked(modality)).norm(dim=1)
        return diff / a.masked(modality).norm(dim=1).clamp_min(1e-30)
    raise ValueError(f"unknown explanation distance {kind!r}; use 'mass', 'tv' or 'relative_l2'")


REFERENCES = ("neutral", "mean", "resample")
"""What an ablated modality m is replaced by in :func:`granger`: ``"neutral"`` (the adapter's neutral
input), ``"mean"`` (the mean of m's LM-input embeddings, position by position, over the inputs of the
dataset with the same m positions), ``"resample"``
(m's LM-input embeddings from the next input of the dataset with the same m positions)."""


@dataclass
class GrangerResult:
    """What :func:`granger` returns.

    Attributes:
        influence: one row per (input, reference, ablated modality m): ``delta_js`` (Delta_m, JS
            divergence of the final-position distributions, nats), ``delta_prob`` (drop of the
            predicted token's probability).
        explanations: one row per (input, explainer, reference, m, explained modality n): ``term``
            (``"self"`` for n == m: delta_m = d(E_m(x), E_m(x without m)); ``"cross"``: delta_{m->n}),
            ``delta`` (:func:`explanation_distance`), ``importance_m`` (the explainer's share of score
            mass on m for the unablated input), and Delta_m.
        summary: one row per (explainer, reference, m, n): the paper's one-sided relation delta >=
            kappa * Delta - lambda at all inputs (``kappa_all``, ``lambda_all``) and at the stated
            quantile ``fraction`` (``kappa``, ``lambda``) with lambda <= ``tolerance``;
            ``spearman_importance`` and ``spearman_delta`` (rank correlations over inputs of Delta_m
            with importance_m and with delta).
        calibration: one row per (explainer, reference, term): the two-sided calibration of delta
            against Delta_m over all (input, m[, n]) items, each with a cluster-bootstrap interval
            over inputs: ``rank`` (Spearman), ``slope`` and ``r2`` (least squares delta ~ Delta),
            ``mean_delta``; ``rank_random`` and ``rank_minus_random`` (paired interval): the null from
            the ``random`` control explainer, when it was run; ``calibrated`` (rank interval above 0),
            ``beats_random`` (the paired interval above 0).
        violations: the inputs that break the relation most: ``hidden_dependency`` (Delta_m large,
            explanation unmoved) and ``over_credit`` (Delta_m near zero, importance on m high).
        distance, fraction, tolerance: the settings used.
        skipped: the (input, reference, modality) ablations that could not be built, with the reason.
    """

    influence: pd.DataFrame
    explanations: pd.DataFrame
    summary: pd.DataFrame
    violations: pd.DataFrame
    distance: str
    fraction: float
    tolerance: float
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped: list[str] = field(default_factory=list)


def kappa_lambda(
    delta_out: np.ndarray, delta_expl: np.ndarray, fraction: float = 0.9, tolerance: float = 0.05
) -> tuple[float, float]:
    """The largest kappa such that ``delta_expl >= kappa * delta_out - lambda`` holds for
    ``fraction`` of the inputs (1.0: all) with some lambda <= ``tolerance``, and the smallest such lambda.

    lambda(kappa) = max(0, quantile_fraction(kappa * delta_out - delta_expl)) is nondecreasing in
    kappa (Delta >= 0), so kappa is found by a vectorised search: each round evaluates lambda on a
    grid of 64 kappas in one quantile call and keeps the cell where it crosses ``tolerance`` (10 rounds:
    the precision of 60 bisection steps).
    """
    delta_out, delta_expl = np.asarray(delta_out, float), np.asarray(delta_expl, float)

    def lam(kappa: np.ndarray) -> np.ndarray:
        return np.maximum(0.0, np.quantile(kappa[:, None] * delta_out - delta_expl, fraction, axis=1))

    if not len(delta_out):
        return 0.0, float("nan")
    at_zero = float(lam(np.zeros(1))[0])
    if at_zero > tolerance:
        return 0.0, at_zero
    powers = 2.0 ** np.arange(31)  # 1 ... ~1e9, as the doubling search
    fits = lam(powers) <= tolerance
    if fits.all():
        return float("inf"), float(lam(powers[-1:])[0])
    low, high = (0.0 if fits.argmin() == 0 else powers[fits.argmin() - 1]), powers[fits.argmin()]
    for _ in range(10):
        grid = np.linspace(low, high, 64)
        ok = lam(grid) <= tolerance  # True up to the crossing (lambda is nondecreasing)
        last = int(ok.argmin()) - 1
        low, high = grid[last], grid[last + 1]
    return float(low), float(lam(np.array([low]))[0])


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = pd.Series(list(a), dtype=float), pd.Series(list(b), dtype=float)
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(a.rank().corr(b.rank()))


def granger(
    hooked: HookedModel,
    inputs: Dataset,
    explainers: Sequence[str | Explainer] = ("integrated_gradients",),
    *,
    mode: str = "joint",
    distance: str = "mass",
    references: Sequence[str] = ("neutral",),
    fraction: float = 0.9,
    tolerance: float = 0.05,
    controls: bool = False,
    options: Mapping[str, dict] | None = None,
    n_resamples: int = 999,
    seed: int = 0,
    progress: bool = True,
) -> GrangerResult:
    """Granger-style modality influence over the rows of ``inputs`` (a dataset), as the paper defines it.

    For each row x, reference r and modality m: x_m = x with m replaced by r (:data:`REFERENCES`).
    Delta_m is the output change; every explainer explains the same quantity (the probability of
    x's predicted token) on x and on x_m, giving the self term delta_m and the cross terms
    delta_{m->n}.

    Args:
        explainers: registered names or callables (:data:`mmlens.methods.explainers.Explainer`).
        mode: explainer mode (``"joint"``; or ``"unimodal"``: each modality n explained alone).
        distance: explanation distance (:func:`explanation_distance`).
        references: which of :data:`REFERENCES`; ``"mean"``/``"resample"`` act on the LM-input
            embeddings and need explainers of :data:`mmlens.methods.explainers.EMBEDS_ONLY`.
        controls: add the control explainers (``random``, ``constant``, ``inverted``).
        options: per-explainer keyword options, e.g. ``{"integrated_gradients": {"steps": 16}}``.
        n_resamples, seed: the bootstrap of the calibration intervals.
    """
    items = examples(hooked, inputs)
    present = _modalities(hooked, items)
    modalities = [m for m in present if m in hooked.adapter.neutral]
    if not modalities:
        raise ValueError(
            f"no modality of these inputs ({present}) has a neutral reference in adapter {hooked.adapter.name!r}"
        )
    bad = [r for r in references if r not in REFERENCES]
    if bad:
        raise ValueError(f"references {bad} are unknown; use some of {list(REFERENCES)}")
    chosen = _Explainers.of(list(explainers) + (list(CONTROLS) if controls else []), options, mode)
    ablations = _Ablations(hooked, items, modalities, references)
    influence, rows = [], []
    bar = tqdm(total=len(items), desc="granger", disable=not progress)
    for start in range(0, len(items), EXPLAINED_TOGETHER):
        xs = items[start : start + EXPLAINED_TOGETHER]
        setups = prepare_rows(hooked, xs, None, "joint")
        moves = ablations.of_rows(start, xs, setups)
        explained = chosen.explain_modes(hooked, xs + [move[3] for move in moves], setups + [move[4] for move in moves])
        for (k, r, m, _, moved_setup), moved in zip(moves, explained[len(xs) :]):
            setup = setups[k]
            influence.append(
                {
                    "input": start + k,
                    "reference": r,
                    "modality": m,
                    "delta_js": float(js_divergence(setup.logits, moved_setup.logits)[0]),
                    "delta_prob": float(setup.value[0] - moved_setup.value[0]),
                }
            )
            rows += _granger_rows(start + k, r, m, modalities, explained[k], moved, distance, mode)
        bar.update(len(xs))
    bar.close()
    influence_df = pd.DataFrame(influence)
    expl = pd.DataFrame(rows)
    if not expl.empty:
        expl = expl.merge(influence_df.rename(columns={"modality": "ablated"}), on=["input", "reference", "ablated"])
    summary, violations = granger_summary(expl, fraction, tolerance)
    calibration = granger_calibration(expl, n_resamples=n_resamples, seed=seed)
    return GrangerResult(
        influence_df, expl, summary, violations, distance, fraction, tolerance, calibration, ablations.skipped
    )


def _granger_rows(
    i: int, r: str, m: str, modalities: list[str], base: dict, moved: dict, distance: str, mode: str
) -> list[dict]:
    """The ``explanations`` rows of input ``i`` with m replaced by reference ``r``."""
    rows = []
    for name in base:
        for n in modalities:
            rows.append(
                {
                    "input": i,
                    "explainer": name,
                    "reference": r,
                    "ablated": m,
                    "explained": n,
                    "term": "self" if n == m else "cross",
                    "delta": float(explanation_distance(base[name][n], moved[name][n], n, distance)[0]),
                    "importance_m": float(base[name][m].importance()[m][0]) if mode == "joint" else float("nan"),
                }
            )
    return rows


class _Ablations:
    """The ablated variants of every input: (reference, modality, inputs, setup)."""

    def __init__(self, hooked: HookedModel, items: list[dict], modalities: list[str], references: Sequence[str]):
        self.hooked, self.items, self.modalities, self.references = hooked, items, modalities, references
        self.skipped: list[str] = []
        if any(r != "neutral" for r in references):
            self.setups = [prepare(hooked, x, None, "joint") for x in items]
            self.masks = {m: [s.spans.masks[m][0].cpu() for s in self.setups] for m in modalities}

    def _donor(self, i: int, m: str, r: str) -> Tensor:
        """Float[1, seq, d]: the embeddings that replace m's positions of input ``i``."""
        masks = self.masks[m]
        same = [j for j in range(len(masks)) if torch.equal(masks[j], masks[i])]
        if r == "mean":
            if len(same) < 2:
                raise ValueError(f"reference 'mean': no other input has the same {m!r} positions as input {i}")
            return torch.cat([self.setups[j].embeds for j in same]).mean(0, keepdim=True)
        others = [j for j in same if j != i]
        if not others:
            raise ValueError(f"reference 'resample': no other input has the same {m!r} positions as input {i}")
        return self.setups[min(others, key=lambda j: (j - i) % len(masks))].embeds

    def of_rows(self, start: int, xs: list[dict], setups: list[Setup]) -> list[tuple]:
        """(k, reference, m, inputs, setup) for every row k of ``xs`` (inputs ``start + k``, prepared
        together by :func:`prepare_rows`), reference and modality, in that order. Each modality's
        neutral variants are rebased on their rows' recordings (:func:`_draw_setups`): a variant whose
        embeddings equal its row's up to the readout gets the row's logits bit for bit, so an unused
        modality's Delta is exactly 0; where they cannot be rebased they are prepared together like
        the rows were (the same shapes at the same places, so equal rows give equal logits)."""
        neutral: dict[tuple[int, str], tuple[dict, Setup]] = {}
        if "neutral" in self.references:
            for m in self.modalities:
                have = [k for k, setup in enumerate(setups) if m in setup.spans.masks]
                moved = [self.hooked.neutral(xs[k], m) for k in have]
                prepared = _draw_setups(self.hooked, setups, list(zip(have, moved)))
                neutral.update({(k, m): pair for k, pair in zip(have, zip(moved, prepared))})
        out = []
        for k, (x, setup) in enumerate(zip(xs, setups)):
            for r in self.references:
                for m in self.modalities:
                    if m not in setup.spans.masks:
                        continue
                    if r == "neutral":
                        out.append((k, r, m, *neutral[k, m]))
                        continue
                    try:
                        donor = self._donor(start + k, m, r).to(setup.embeds.device)
                    except ValueError as err:
                        self.skipped.append(str(err))
                        continue
                    embeds = torch.where(setup.spans.masks[m].to(setup.embeds.device)[..., None], donor, setup.embeds)
                    out.append((k, r, m, x, variant_setup(self.hooked, x, setup, embeds)))
        return out


def granger_summary(expl: pd.DataFrame, fraction: float, tolerance: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``summary`` and ``violations`` tables of a :class:`GrangerResult` from its ``explanations`` table."""
    if expl.empty:
        return pd.DataFrame(), pd.DataFrame()
    if "reference" not in expl:
        expl = expl.assign(reference="neutral")
    summary, violations = [], []
    keys = ["explainer", "reference", "ablated", "explained"]
    for (name, r, m, n), group in expl.groupby(keys, sort=False):
        kappa_all, lam_all = kappa_lambda(group.delta_js.to_numpy(), group.delta.to_numpy(), 1.0, tolerance)
        kappa, lam = kappa_lambda(group.delta_js.to_numpy(), group.delta.to_numpy(), fraction, tolerance)
        summary.append(
            {
                "explainer": name,
                "reference": r,
                "ablated": m,
                "explained": n,
                "term": "self" if m == n else "cross",
                "n_inputs": len(group),
                "kappa_all": kappa_all,
                "lambda_all": lam_all,
                "kappa": kappa,
                "lambda": lam,
                "spearman_importance": _spearman(group.delta_js, group.importance_m),
                "spearman_delta": _spearman(group.delta_js, group.delta),
                "mean_delta_js": group.delta_js.mean(),
                "mean_delta": group.delta.mean(),
            }
        )
        violations += _violations(group, (name, r, m, n))
    return pd.DataFrame(summary), pd.DataFrame(violations)


def _violations(group: pd.DataFrame, key: tuple) -> list[dict]:
    """The worst ``hidden_dependency`` and ``over_credit`` input of one (explainer, reference, m, n) group."""
    scale_out = max(group.delta_js.max(), 1e-30)
    scale_expl = max(group.delta.max(), 1e-30)
    hidden = group.delta_js / scale_out - group.delta / scale_expl
    over = group.importance_m - group.delta_js / scale_out
    out = []
    for kind, score in (("hidden_dependency", hidden), ("over_credit", over)):
        worst = score.idxmax()
        if np.isfinite(score[worst]) and score[worst] > 0:
            out.append(
                {
                    **dict(zip(("explainer", "reference", "ablated", "explained"), key)),
                    "kind": kind,
                    "input": int(group.input[worst]),
                    "score": float(score[worst]),
                    "delta_js": float(group.delta_js[worst]),
                    "delta": float(group.delta[worst]),
                    "importance_m": float(group.importance_m[worst]),
                }
            )
    return out


def granger_calibration(
    expl: pd.DataFrame, *, confidence: float = 0.95, n_resamples: int = 999, seed: int = 0
) -> pd.DataFrame:
    """The ``calibration`` table of a :class:`GrangerResult` from its ``explanations`` table: per
    (explainer, reference, term), the two-sided calibration of delta against Delta_m (JS) over items,
    with cluster-bootstrap intervals over inputs, and the null of the ``random`` control when present."""
    if expl.empty:
        return pd.DataFrame()
    if "term" not in expl:
        expl = expl.assign(term=np.where(expl.ablated == expl.explained, "self", "cross"))
    if "reference" not in expl:
        expl = expl.assign(reference="neutral")
    expl = pd.concat([expl, expl.assign(term="all")], ignore_index=True)
    inputs = np.sort(expl.input.unique())
    position = {v: k for k, v in enumerate(inputs)}
    out = []
    for (name, r, term), group in expl.groupby(["explainer", "reference", "term"], sort=False):
        group = group.sort_values(["input", "ablated", "explained"])
        null = expl[(expl.explainer == "random") & (expl.reference == r) & (expl.term == term)]
        null = null.sort_values(["input", "ablated", "explained"])
        cluster = group.input.map(position).to_numpy()
        x, y = group.delta_js.to_numpy(), group.delta.to_numpy()
        y0 = null.delta.to_numpy() if len(null) == len(group) and name != "random" else None

        def rank(w: np.ndarray, y: np.ndarray = y) -> np.ndarray:
            return weighted_spearman(x, y, w[:, cluster])

        def boot(statistic) -> tuple[float, float, float]:
            return cluster_bootstrap(inputs, statistic, n_resamples=n_resamples, confidence=confidence, seed=seed)

        row = {"explainer": name, "reference": r, "term": term, "n_items": len(group), "n_inputs": len(inputs)}
        for label, statistic in (
            ("rank", rank),
            ("slope", lambda w: weighted_fit(x, y, w[:, cluster])[0]),
            ("r2", lambda w: weighted_fit(x, y, w[:, cluster])[1]),
            ("mean_delta", lambda w: weighted_mean(y, w[:, cluster])),
        ):
            row[label], row[f"{label}_low"], row[f"{label}_high"] = boot(statistic)
        if y0 is not None:
            row["rank_random"] = float(rank(np.ones((1, len(inputs)), dtype=int), y0)[0])
            diff = boot(lambda w: rank(w) - rank(w, y0))
            row["rank_minus_random"], row["rank_minus_random_low"], row["rank_minus_random_high"] = diff
        row["calibrated"] = bool(row["rank_low"] > 0)
        row["beats_random"] = bool(row.get("rank_minus_random_low", float("nan")) > 0)
        out.append(row)
    return pd.DataFrame(out)


@dataclass
class FaithfulnessResult:
    """What :func:`faithfulness` returns.

    Attributes:
        curves: one row per (input, scope, k, source): ``scope`` a modality, ``"joint"`` (every
            modality's top-k fraction at once) or ``"global"`` (the top-k fraction of all explained
            positions, whatever their modality), ``source`` ``"explanation"`` or ``"random"`` (mean
            over draws), ``f`` the metric on the input, ``f_keep``, ``f_remove``,
            ``sufficiency_gap`` (|f_keep - f|), ``necessity_drop`` (f - f_remove).
        areas: per (scope, source): areas under the mean curves over k in [0, 1] (trapezoid):
            ``aoc_sufficiency_gap`` (lower is better) and ``auc_necessity_drop`` (higher is better).
        intervals: per (scope, measure) with measure ``aoc_sufficiency_gap`` or
            ``auc_necessity_drop``: the mean per-input area of the ``explanation`` and of
            ``random``, their paired difference ``diff`` (explanation - random) with a
            cluster-bootstrap interval over inputs (``diff_low``, ``diff_high``), and ``better``:
            whether the interval excludes 0 on the good side (necessity above, sufficiency gap below).
        method: the explainer (``"unit_scores"`` when scores per input unit were given); ``metric``:
            what f measures (:data:`PREDICTION_METRICS`); ``level``: where keep/remove acted,
            ``"embedding"`` (positions of the LM-input embeddings) or ``"input"`` (raw input units:
            then ``curves`` and ``intervals`` count units, not positions).
    """

    curves: pd.DataFrame
    areas: pd.DataFrame
    method: str
    intervals: pd.DataFrame = field(default_factory=pd.DataFrame)
    metric: str = "prob"
    level: str = "embedding"


LEVELS = ("embedding", "input")
"""Where :func:`faithfulness` keeps and removes: the LM-input embeddings, or the raw input units."""


def faithfulness(
    hooked: HookedModel,
    inputs: Dataset,
    explainer: str | Explainer = "integrated_gradients",
    *,
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    random_draws: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    metric: str = "prob",
    options: Mapping[str, Any] | None = None,
    explanations: Sequence[Explanation] | None = None,
    n_resamples: int = 999,
    progress: bool = True,
    level: str = "embedding",
    unit_scores: Sequence[Mapping[str, Tensor]] | None = None,
) -> FaithfulnessResult:
    """Sufficiency and necessity of an explainer's top-k positions (or input units) per modality,
    jointly (each modality's top-k) and globally (the top-k of all of them across modalities).

    ``level="embedding"``: keep_k sets every explained position of the scope outside its top-k to its
    neutral reference embedding (at the LM's input embeddings, after the encoders mixed patches and
    nodes); remove_k sets the top-k positions. ``level="input"``: the same on each modality's raw input
    units (``Adapter.input_units``: vision patches' pixels, tokens, audio frames -> the modality's
    neutral reference; graph nodes' features -> neutral, edges dropped), the model rerun plainly. A
    unit's score is the score of its one LM position (a vision patch's token, the token itself, an
    audio token's run of frames); where no such mapping exists (graph nodes and edges; images with a
    CLS token or tiles) it is refused unless ``unit_scores`` (one per row: modality -> Float[n_units])
    gives the scores, in which case nothing is explained. ``metric``
    (:data:`mmlens.methods.setups.PREDICTION_METRICS`) measures each input's predicted token.
    ``explanations`` (one per row, from :func:`mmlens.explain`) skips explaining.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    items = examples(hooked, inputs)
    fractions = sorted({float(k) for k in fractions})
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    generator = torch.Generator().manual_seed(seed)
    for given, what in ((explanations, "explanations"), (unit_scores, "unit_scores")):
        if given is not None and len(given) != len(items):
            raise ValueError(f"got {len(given)} {what} for {len(items)} inputs")
    if unit_scores is not None and level != "input":
        raise ValueError(f"unit_scores are scores of input units; pass level='input' with them, not {level!r}")
    options = dict(options or {})
    mode = options.pop("mode", "joint")
    check_method(explainer)
    name = "unit_scores" if unit_scores is not None else explainer_name(explainer)
    plan = _FaithfulnessPlan(
        explainer, mode, metric, level, options, explanations, unit_scores, fractions, random_draws, batch_size
    )
    rows = []
    bar = tqdm(total=len(items), desc=f"faithfulness ({name}, {level})", disable=not progress)
    for start in range(0, len(items), EXPLAINED_TOGETHER):
        chunk = range(start, min(start + EXPLAINED_TOGETHER, len(items)))
        rows += _faithfulness_chunk(hooked, items, chunk, plan, generator)
        bar.update(len(chunk))
    bar.close()
    curves = pd.DataFrame(rows)
    intervals = faithfulness_intervals(curves, n_resamples=n_resamples, seed=seed)
    return FaithfulnessResult(curves, areas(curves), name, intervals, metric, level)


@dataclass(frozen=True)
class _FaithfulnessPlan:
    """What :func:`faithfulness` computes for every input (its arguments)."""

    explainer: str | Explainer
    mode: str
    metric: str
    level: str
    options: Mapping[str, Any]
    explanations: Sequence[Explanation] | None
    unit_scores: Sequence[Mapping[str, Tensor]] | None
    fractions: list[float]
    random_draws: int
    batch_size: int


def _faithfulness_chunk(
    hooked: HookedModel, items: list[dict], chunk: range, plan: _FaithfulnessPlan, generator: torch.Generator
) -> list[dict]:
    """The ``curves`` rows of inputs ``chunk``: explained together, their masked variants run together."""
    mode, unit_scores = plan.mode, plan.unit_scores
    xs, setups = [items[i] for i in chunk], []
    for setup in prepare_rows(hooked, xs, None, "joint"):
        own_metric = prediction_metric(setup.logits, plan.metric)
        setups.append(replace(setup, metric=own_metric, value=own_metric(setup.logits).detach()))
    if unit_scores is not None:
        given: list[Explanation | None] = [None] * len(xs)
    elif plan.explanations is not None:
        given = [plan.explanations[i] for i in chunk]
    else:
        own = [s if mode == "joint" else prepare(hooked, x, s.metric, mode) for x, s in zip(xs, setups)]
        given = list(explain_rows(hooked, own, xs, plan.explainer, mode, plan.options))
    jobs, labelled = [], []
    for i, x, setup, e in zip(chunk, xs, setups, given):
        units = input_units(hooked, x, setup.spans) if plan.level == "input" else None
        if units is None:
            members = {m: setup.spans.masks[m][0].cpu() for m in setup.spans.modalities}
            scores, explained = e.scores[0].cpu(), setup.explained[0].cpu()
        else:
            scores, members = _unit_scores(hooked, x, units, e, None if unit_scores is None else unit_scores[i])
            explained = torch.ones_like(scores, dtype=torch.bool)
        masks, labels = _faithfulness_masks(scores, members, explained, plan.fractions, plan.random_draws, generator)
        labelled.append((i, x, setup, units, members, masks, labels))
        if units is None:
            jobs.append((x, setup, masks))
    values = iter(masked_values_rows(hooked, jobs, plan.batch_size))
    rows = []
    for i, x, setup, units, members, masks, labels in labelled:
        got = next(values).tolist() if units is None else _unit_values(hooked, x, setup, units, members, masks)
        rows += _faithfulness_rows(i, float(setup.value[0]), labels, got)
    return rows


UnitsOfRow = dict[str, tuple[InputUnits, int]]
"""Modality -> (its :class:`InputUnits`, the row's unit count)."""


def input_units(hooked: HookedModel, x: dict, spans: ModalitySpans) -> UnitsOfRow:
    """Each modality of one input row with its adapter's input units and their count; raises naming the
    modalities whose adapter declares none."""
    table = hooked.adapter.input_units
    missing = [m for m in spans.modalities if m not in table]
    if missing:
        raise ValueError(
            f"level='input': adapter {hooked.adapter.name!r} declares no input units for {missing} (it has "
            f"{sorted(table)}); use level='embedding', or add Adapter.input_units for them "
            "(mmlens.core.units: patch_units, token_units, frame_units, graph_units)"
        )
    return {m: (table[m], int(table[m].count(hooked.model, x, spans))) for m in spans.modalities}


def _unit_scores(
    hooked: HookedModel, x: dict, units: UnitsOfRow, e: Explanation | None, given: Mapping[str, Tensor] | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Float[n]: every unit's score (modalities one after another, in span order), and each modality's
    Bool[n] membership: ``given`` scores, else the score in ``e`` of each unit's LM position."""
    parts, members, start = [], {}, 0
    total = sum(n for _, n in units.values())
    for m, (unit, n) in units.items():
        if given is not None:
            if m not in given or torch.as_tensor(given[m]).numel() != n:
                raise ValueError(f"unit_scores[{m!r}] must hold {n} scores ({unit.unit} units of this input)")
            parts.append(torch.as_tensor(given[m], dtype=torch.float32).reshape(-1).cpu())
        elif unit.positions is None:
            raise ValueError(
                f"level='input': {m!r} units ({unit.unit}) have no LM position to read an explanation score "
                f"from; pass unit_scores (one per input: {{{m!r}: Float[{n}]}}, from an input-level explainer)"
            )
        else:
            parts.append(e.scores[0, unit.positions(hooked.model, x, e.spans).cpu()].float().cpu())
        members[m] = torch.zeros(total, dtype=torch.bool)
        members[m][start : start + n] = True
        start += n
    return torch.cat(parts), members


def _unit_values(
    hooked: HookedModel, x: dict, setup: Setup, units: UnitsOfRow, members: dict[str, Tensor], masks: list[Tensor]
) -> list[float]:
    """The metric of one input row with each Bool[n_units] mask's units set to their modality's neutral
    reference on the raw inputs (one plain forward per distinct mask; an empty mask is the input)."""
    done: dict[bytes, float] = {}
    out = []
    for mask in masks:
        key = mask.numpy().tobytes()
        if key not in done:
            done[key] = float(setup.value[0]) if not mask.any() else _unit_value(hooked, x, setup, units, members, mask)
        out.append(done[key])
    return out


def _unit_value(
    hooked: HookedModel, x: dict, setup: Setup, units: UnitsOfRow, members: dict[str, Tensor], mask: Tensor
) -> float:
    variant = x
    for m, (unit, _) in units.items():
        removed = mask[members[m]]
        if removed.any():
            variant = unit.apply(hooked.model, variant, setup.spans, ~removed)
    if not hooked.spans(variant).same_layout(setup.spans):
        raise ValueError("an input-level removal changed the modality layout; the adapter's input_units must keep it")
    with torch.no_grad():
        logits = hooked.readout_logits(hooked.run(variant).logits, variant)
    return float(setup.metric(logits)[0])


RANDOM_TOP_K = "random top-k"
"""The source name of the random masks' curve in :func:`necessity_areas` (not the ``random`` explainer)."""


def necessity_areas(
    hooked: HookedModel,
    items: Sequence[dict],
    explanations: Mapping[str, Sequence[Explanation]],
    *,
    fractions: Sequence[float],
    random_draws: int,
    scope: str = "joint",
    seed: int = 0,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Per input (a batch-1 row of ``items``) and source (each explainer of ``explanations``, and
    :data:`RANDOM_TOP_K`): the area over k of the necessity drop f(x) - f(remove_k) of ``scope``, with f the
    probability of the input's predicted token. The numbers of ``faithfulness(..., explanations=...)``
    (same masks, same random draws: :func:`areas` of its curves is the mean of these), for several
    explainers in one batched pass per input: one forward of the input, the random masks shared by
    every explainer, only the remove variants of ``scope`` run. Columns: input, source, auc_necessity_drop."""
    fractions = sorted({float(k) for k in fractions})
    if len(fractions) < 2 or fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must be at least two values in [0, 1], got {fractions}")
    bad = {name: len(es) for name, es in explanations.items() if len(es) != len(items)}
    if bad or not explanations:
        raise ValueError(f"explanations: need one per input ({len(items)}) for each explainer, got {bad or 'none'}")
    if RANDOM_TOP_K in explanations:
        raise ValueError(f"explanations: {RANDOM_TOP_K!r} names the random baseline; rename that explainer")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, x in enumerate(items):
        setup = prepare(hooked, x, None, "joint")
        own_metric = prediction_metric(setup.logits, "prob")
        setup = replace(setup, metric=own_metric, value=own_metric(setup.logits).detach())
        masks, labels, state = [], [], generator.get_state()
        members = {m: setup.spans.masks[m][0].cpu() for m in setup.spans.modalities}
        explained = setup.explained[0].cpu()
        for name, es in explanations.items():
            generator.set_state(state)  # every explainer sees the draws faithfulness() would give it
            found, found_labels = _faithfulness_masks(
                es[i].scores[0].cpu(), members, explained, fractions, random_draws, generator
            )
            for mask, (s, k, source, _, which) in zip(found, found_labels):
                if s == scope and which == "remove" and (source == "explanation" or name == next(iter(explanations))):
                    masks.append(mask)
                    labels.append((name if source == "explanation" else RANDOM_TOP_K, k))
        values = masked_values(hooked, x, setup, masks, batch_size).numpy()
        drops = pd.DataFrame(labels, columns=["source", "k"]).assign(drop=float(setup.value[0]) - values)
        for source, group in drops.groupby("source", sort=False)["drop"]:
            curve = group.groupby(drops.k[group.index]).mean()  # random: the mean over draws
            rows.append({"input": i, "source": source, "auc_necessity_drop": float(np.trapezoid(curve, curve.index))})
    return pd.DataFrame(rows)


def _faithfulness_masks(
    scores: Tensor,
    members: Mapping[str, Tensor],
    explained: Tensor,
    fractions: list[float],
    random_draws: int,
    generator: torch.Generator,
) -> tuple[list[Tensor], list[tuple]]:
    """The keep and remove masks Bool[n] of one input (over its positions or its input units: ``scores``
    Float[n], ``members`` modality -> Bool[n], ``explained`` Bool[n]), with their (scope, k, source,
    draw, which) labels. A mask marks what takes the neutral reference."""
    modalities = list(members)
    scopes = modalities + (["joint", "global"] if len(modalities) > 1 else [])
    masks, labels = [], []
    for scope in scopes:
        group = modalities if scope in ("joint", "global") else [scope]
        scope_mask = torch.zeros_like(explained)
        for n in group:
            scope_mask |= members[n]
        for k in fractions:
            if scope == "global":
                top = _global_top(scores, scope_mask & explained, k)
                draws = [_random_global(scope_mask & explained, k, generator) for _ in range(random_draws)]
            else:
                top = torch.zeros_like(scope_mask)
                for n in group:
                    top |= _global_top(scores, members[n], k)
                draws = [_random_top(members, group, k, generator) for _ in range(random_draws)]
            for source, chosen in (("explanation", [top]), ("random", draws)):
                for d, mask in enumerate(chosen):
                    masks += [scope_mask & ~mask, mask]
                    labels += [(scope, k, source, d, "keep"), (scope, k, source, d, "remove")]
    return masks, labels


def _global_top(scores: Tensor, where: Tensor, k: float) -> Tensor:
    """Bool[n]: the ``ceil(k * m)`` highest scores among the ``m`` entries of ``where`` (NaN lowest, ties by index)."""
    positions = where.nonzero()[:, 0]
    count = int(np.ceil(k * len(positions) - 1e-9))
    order = torch.argsort(scores[positions].nan_to_num(float("-inf")), descending=True, stable=True)
    out = torch.zeros_like(where)
    out[positions[order[:count]]] = True
    return out


def _random_global(where: Tensor, k: float, generator: torch.Generator) -> Tensor:
    """Bool[n]: ``ceil(k * m)`` random entries of the ``m`` of ``where``."""
    positions = where.nonzero()[:, 0]
    count = int(np.ceil(k * len(positions) - 1e-9))
    out = torch.zeros_like(where)
    out[positions[torch.randperm(len(positions), generator=generator)[:count]]] = True
    return out


def _faithfulness_rows(i: int, f: float, labels: list[tuple], values: list[float]) -> list[dict]:
    """The ``curves`` rows of input ``i`` from its masked values (random draws averaged)."""
    table = pd.DataFrame(
        [(*label, v) for label, v in zip(labels, values)], columns=["scope", "k", "source", "draw", "which", "value"]
    )
    wide = table.pivot_table(index=["scope", "k", "source", "draw"], columns="which", values="value").reset_index()
    wide = wide.groupby(["scope", "k", "source"], sort=False)[["keep", "remove"]].mean().reset_index()
    return [
        {
            "input": i,
            "scope": r.scope,
            "k": r.k,
            "source": r.source,
            "f": f,
            "f_keep": r.keep,
            "f_remove": r.remove,
            "sufficiency_gap": abs(r.keep - f),
            "necessity_drop": f - r.remove,
        }
        for r in wide.itertuples(index=False)
    ]


def _paired_interval(a: np.ndarray, b: np.ndarray, confidence: float, n_resamples: int, seed: int) -> Interval:
    """The bootstrap interval of mean(a - b) over inputs (NaN bounds for fewer than 2 inputs)."""
    if len(a) < 2:
        return Interval(float(np.mean(a - b)), float("nan"), float("nan"), confidence, "too few inputs")
    return bootstrap_ci(a, paired_with=b, confidence=confidence, n_resamples=n_resamples, seed=seed)


def faithfulness_intervals(
    curves: pd.DataFrame, *, confidence: float = 0.95, n_resamples: int = 999, seed: int = 0
) -> pd.DataFrame:
    """The ``intervals`` table of a :class:`FaithfulnessResult` from its ``curves``: per-input areas,
    explanation vs random, paired over inputs."""
    if curves.empty or curves.k.nunique() < 2:
        return pd.DataFrame()
    per = []
    for (i, scope, source), group in curves.groupby(["input", "scope", "source"], sort=False):
        group = group.sort_values("k")
        k = group.k.to_numpy()
        per.append(
            {
                "input": i,
                "scope": scope,
                "source": source,
                "aoc_sufficiency_gap": float(np.trapezoid(group.sufficiency_gap.to_numpy(), k)),
                "auc_necessity_drop": float(np.trapezoid(group.necessity_drop.to_numpy(), k)),
            }
        )
    per = pd.DataFrame(per)
    out = []
    for scope, group in per.groupby("scope", sort=False):
        wide = group.pivot_table(index="input", columns="source", values=["aoc_sufficiency_gap", "auc_necessity_drop"])
        for measure, sign in (("aoc_sufficiency_gap", -1), ("auc_necessity_drop", 1)):
            a, b = wide[measure]["explanation"].to_numpy(), wide[measure]["random"].to_numpy()
            interval = _paired_interval(a, b, confidence, n_resamples, seed)
            diff, low, high = interval.estimate, interval.low, interval.high
            out.append(
                {
                    "scope": scope,
                    "measure": measure,
                    "n_inputs": len(a),
                    "explanation": float(a.mean()),
                    "random": float(b.mean()),
                    "diff": diff,
                    "diff_low": low,
                    "diff_high": high,
                    "better": bool(low > 0) if sign > 0 else bool(high < 0),
                }
            )
    return pd.DataFrame(out)


@dataclass
class StabilityResult:
    """What :func:`stability` returns.

    Attributes:
        samples: one row per (input, explainer, perturbed modality m, source, epsilon, draw, explained
            modality n). ``source``: ``"input"`` (an adapter perturbation ``kind`` of m's raw inputs),
            ``"random"`` (a random direction in the LM-input embeddings at m's positions, of relative
            norm ``epsilon``) or ``"adversarial"`` (the greedy random-restart search inside that ball).
            ``explanation_change``: ||E_n(x) - E_n(x')|| / ||E_n(x)|| (scale-invariant);
            ``input_change``: :func:`mmlens.metrics.perturb.relative_input_change` (NaN for
            embedding-level draws); ``embedding_change``: ||e_m - e'_m|| / ||e_m||; ``ris`` and
            ``res``: their quotients (relative input / embedding stability, Agarwal et al. 2022, with
            denominators floored at ``1e-6``); ``kept``: the prediction was unchanged (only kept
            draws count). Also the raw L2 ``input_distance``, ``explanation_distance``, ``ratio``.
        summary: one row per (explainer, m, n, source, epsilon): ``equation`` ("intra (6)" for
            m == n, "cross (7)"), ``n_inputs``, and over inputs of the per-input supremum over the
            kept draws: ``ris_max``/``ris_median``, ``res_max``/``res_median``, and ``max``, ``p95``,
            ``median`` of the raw ratio's supremum.
        skipped: perturbations that could not be made, and explainers without an adversarial search,
            with the reason.
    """

    samples: pd.DataFrame
    summary: pd.DataFrame
    skipped: dict[str, str]


def stability(
    hooked: HookedModel,
    inputs: Dataset,
    explainers: Sequence[str | Explainer] = ("integrated_gradients",),
    *,
    modalities: Sequence[str] | None = None,
    kinds: Mapping[str, Sequence[str]] | None = None,
    n: int = 4,
    scale: Mapping[str, float] | None = None,
    epsilons: Sequence[float] = (),
    random_draws: int = 3,
    search_steps: int = 2,
    controls: bool = False,
    seed: int = 0,
    options: Mapping[str, dict] | None = None,
    progress: bool = True,
) -> StabilityResult:
    """Relative stability of explanations under small perturbations of each modality m, for the
    explanation of every modality n (Eq. 6 for n = m, Eq. 7 for n != m), as a per-input supremum.

    Draws: ``n`` per adapter perturbation kind of m's raw inputs
    (:func:`mmlens.metrics.perturb.perturb`), and for every ``epsilon`` (relative L2 radius in the
    LM-input embeddings at m's positions) ``random_draws`` random directions plus, for explainers
    that can explain embedding-level variants, a greedy search of ``search_steps`` rounds (each
    tries two random moves of half the radius from the worst point so far, projected into the ball,
    and keeps one if it raises the explanation change). A draw counts only if the predicted token
    is unchanged; both explanations explain the probability of the original prediction.

    Args:
        modalities: which modalities to perturb (default: every one of the inputs).
        kinds: modality -> perturbation kinds (default: every kind the model's adapter declares).
        epsilons: the embedding-ball radii; a curve over epsilon in the summary (none: input kinds only).
        controls: add the control explainers.
    """
    items = examples(hooked, inputs)
    present = _modalities(hooked, items)
    unknown = [m for m in (modalities or []) if m not in present]
    if unknown:
        raise ValueError(f"modalities {unknown} are not in these inputs; they have {present}")
    targets = list(modalities or present)
    chosen = _Explainers.of(list(explainers) + (list(CONTROLS) if controls else []), options)
    plan = _StabilityPlan(chosen, targets, kinds or {}, n, scale, seed, tuple(epsilons), random_draws, search_steps)
    rows, skipped = [], {}
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(items), desc="stability", disable=not progress)
    for start in range(0, len(items), EXPLAINED_TOGETHER):
        xs = items[start : start + EXPLAINED_TOGETHER]
        rows += _stability_chunk(hooked, start, xs, plan, generator, skipped)
        bar.update(len(xs))
    bar.close()
    for name in chosen.names:
        if epsilons and not reads_setup_only(chosen.methods[name]):
            skipped[name] = "no embedding-level draws: the explainer re-runs the inputs (not in EMBEDS_ONLY)"
    samples = pd.DataFrame([{k: v for k, v in r.items() if k != "_embeds"} for r in rows])
    return StabilityResult(samples, stability_summary(samples), skipped)


@dataclass(frozen=True)
class _StabilityPlan:
    """What :func:`stability` computes for every input (its arguments)."""

    chosen: _Explainers
    targets: list[str]
    kinds: Mapping[str, Sequence[str]]
    n: int
    scale: Mapping[str, float] | None
    seed: int
    epsilons: tuple[float, ...]
    random_draws: int
    search_steps: int


def _stability_chunk(
    hooked: HookedModel, start: int, xs: list[dict], plan: _StabilityPlan, generator: torch.Generator, skipped: dict
) -> list[dict]:
    """The samples of inputs ``start..``: the inputs prepared together, then their perturbed draws,
    and all of them explained together (:meth:`_Explainers.explain_rows`); the embedding-ball draws
    after, input by input."""
    from mmlens.metrics.perturb import perturb, relative_input_change

    setups = prepare_rows(hooked, xs, None, "joint")
    found = []
    for k, x in enumerate(xs):
        for m in plan.targets:
            try:
                perturbed = perturb(
                    hooked, x, m, plan.kinds.get(m), n=plan.n, scale=plan.scale, seed=plan.seed + start + k
                )
            except ValueError as err:
                skipped[m] = str(err)
                perturbed = []
            found += [(k, m, draw, p) for draw, p in enumerate(perturbed)]
    moved = _draw_setups(hooked, setups, [(k, p.inputs) for k, _, _, p in found])
    draws = [
        _Draw(p.inputs, setup, (start + k, m, "input", p.kind, draw), relative_input_change(hooked, xs[k], p.inputs, m))
        for (k, m, draw, p), setup in zip(found, moved)
    ]
    draws = [d for d in draws if _draw_distance(setups[d.key[0] - start], d.setup, d.key[1], d.key[3]) > 0]
    explained = plan.chosen.explain_rows(hooked, xs + [d.inputs for d in draws], setups + [d.setup for d in draws])
    rows = []
    for k, (x, setup, base) in enumerate(zip(xs, setups, explained)):
        for m in plan.targets:
            for d, e in zip(draws, explained[len(xs) :]):
                if d.key[:2] == (start + k, m):
                    rows += _sample_rows(setup, base, plan.chosen.names, d, e)
            for epsilon in plan.epsilons:
                key = (start + k, m, epsilon)
                rows += _ball_samples(
                    hooked, x, setup, base, plan.chosen, key, plan.random_draws, plan.search_steps, generator
                )
    return rows


def _draw_setups(hooked: HookedModel, setups: list[Setup], draws: list[tuple[int, dict]]) -> list[Setup]:
    """The setups of perturbed or ablated draws (k: the row ``setups[k]`` they vary, their inputs): rebased on
    that row's recording where they differ from it only in their LM-input embeddings
    (:func:`mmlens.methods.variants.rebased_setups`: no forward of their own, and their masked
    variants share the row's prefix-tree nodes), else prepared together (:func:`prepare_rows`)."""
    out: list[Setup | None] = [None] * len(draws)
    mine = [[d for d, (row, _) in enumerate(draws) if row == k] for k in range(len(setups))]
    rebased = rebase_rows(hooked, [(setup, [draws[d][1] for d in own]) for setup, own in zip(setups, mine)])
    for own, found in zip(mine, rebased):
        if not isinstance(found, CannotRebase):
            for d, moved in zip(own, found):
                out[d] = moved
    rest = [d for d in range(len(draws)) if out[d] is None]
    prepared = prepare_rows(hooked, [draws[d][1] for d in rest], [setups[draws[d][0]].metric for d in rest], "joint")
    for d, setup in zip(rest, prepared):
        out[d] = setup
    return out


@dataclass
class _Explainers:
    """Explainers (registered names or callables) under their report names, each with its mode (the
    ``"mode"`` of its options, else ``default_mode``) and its other keyword options."""

    methods: dict[str, str | Explainer]
    modes: dict[str, str]
    options: dict[str, dict]

    @property
    def names(self) -> list[str]:
        return list(self.methods)

    @classmethod
    def of(
        cls, methods: Sequence[str | Explainer], options: Mapping[str, dict] | None, default_mode: str = "joint"
    ) -> _Explainers:
        """The explainers ``methods`` with their per-explainer ``options`` (names checked, duplicates dropped)."""
        for method in methods:
            check_method(method)
        named = {explainer_name(m): m for m in methods}
        own = {name: dict((options or {}).get(name, {})) for name in named}
        modes = {name: own[name].pop("mode", default_mode) for name in named}
        return cls(named, modes, own)

    def explain(self, hooked: HookedModel, x: dict, setup: Setup) -> dict[str, Explanation]:
        """Each explainer's explanation of input row ``x`` (``setup``: its joint :func:`prepare`, or an
        embedding-level variant of it)."""
        return self.explain_rows(hooked, [x], [setup])[0]

    def explain_rows(self, hooked: HookedModel, xs: list[dict], setups: list[Setup]) -> list[dict[str, Explanation]]:
        """:meth:`explain` of several rows, each explainer explaining them together (:func:`explain_rows`)."""
        out: list[dict[str, Explanation]] = [{} for _ in xs]
        for name, mode in self.modes.items():
            own = [_mode_setup(hooked, x, setup, mode) for x, setup in zip(xs, setups)]
            for row, e in zip(out, explain_rows(hooked, own, xs, self.methods[name], mode, self.options[name])):
                row[name] = e
        return out

    def explain_modes(
        self, hooked: HookedModel, xs: list[dict], setups: list[Setup]
    ) -> list[dict[str, dict[str, Explanation]]]:
        """Per row: explainer -> modality -> the explanation that covers it: one joint explanation, or
        in mode ``"unimodal"`` one per modality; each explainer explains the rows together
        (:func:`explain_rows`)."""
        out: list[dict[str, dict[str, Explanation]]] = [{} for _ in xs]
        for name, mode in self.modes.items():
            method, options = self.methods[name], self.options[name]
            if mode == "joint":
                for row, e, setup in zip(out, explain_rows(hooked, setups, xs, method, mode, options), setups):
                    row[name] = {m: e for m in setup.spans.modalities}
            elif mode == "unimodal":
                for row in out:
                    row[name] = {}
                for m in dict.fromkeys(m for setup in setups for m in setup.spans.modalities):
                    have = [k for k, setup in enumerate(setups) if m in setup.spans.modalities]
                    own = [_mode_setup(hooked, xs[k], setups[k], m) for k in have]
                    for k, e in zip(have, explain_rows(hooked, own, [xs[k] for k in have], method, m, options)):
                        out[k][name][m] = e
            else:
                raise ValueError(f"mode must be 'joint' or 'unimodal', got {mode!r}")
        return out


def _ball_samples(
    hooked: HookedModel,
    x: dict,
    setup: Setup,
    base: dict[str, Explanation],
    chosen: _Explainers,
    key: tuple[int, str, float],
    random_draws: int,
    search_steps: int,
    generator: torch.Generator,
) -> list[dict]:
    """The random and adversarial draws in the embedding ball of relative radius ``epsilon`` around
    input ``i``'s embeddings at m's positions (``key`` = (i, m, epsilon))."""
    i, m, epsilon = key
    names = [k for k, v in chosen.methods.items() if reads_setup_only(v)]
    able = _Explainers({k: chosen.methods[k] for k in names}, {k: chosen.modes[k] for k in names}, chosen.options)
    if not able.methods:
        return []
    where = setup.spans.masks[m].to(setup.embeds.device)[..., None]
    radius = epsilon * float(torch.where(where, setup.embeds, 0.0).norm())

    def move(center: Tensor, size: float) -> Tensor:
        step = torch.randn(setup.embeds.shape, generator=generator).to(setup.embeds) * where
        moved = center + size * step / step.norm().clamp_min(1e-30)
        offset = moved - setup.embeds
        return setup.embeds + offset * min(1.0, radius / max(float(offset.norm()), 1e-30))

    rows = []
    for draw in range(random_draws):
        moved = variant_setup(hooked, x, setup, move(setup.embeds, radius))
        rows += _stability_samples(hooked, setup, base, able, x, moved, (i, m, "random", epsilon, draw))
    for name in able.names:
        one = _Explainers({name: able.methods[name]}, {name: able.modes[name]}, able.options)
        own = [r for r in rows if r["explainer"] == name and r["kept"] and r["explained"] == m]
        best = max(own, key=lambda r: r["explanation_change"], default=None)
        center = best["_embeds"] if best else setup.embeds
        score = best["explanation_change"] if best else -1.0
        for step in range(search_steps):
            tries = []
            for _ in range(2):
                moved = variant_setup(hooked, x, setup, move(center, radius / 2))
                tries += _stability_samples(hooked, setup, base, one, x, moved, (i, m, "adversarial", epsilon, step))
            found = [r for r in tries if r["kept"] and r["explained"] == m]
            top = max(found, key=lambda r: r["explanation_change"], default=None)
            if top is not None and top["explanation_change"] > score:
                center, score = top["_embeds"], top["explanation_change"]
                rows += [r for r in tries if r["_embeds"] is top["_embeds"]]
    return rows


@dataclass(frozen=True)
class _Draw:
    """One perturbed draw of an input: its input row and setup, its key (input, m, source, kind or
    epsilon, draw) and its relative raw-input change (NaN for embedding-level draws)."""

    inputs: dict
    setup: Setup
    key: tuple
    input_change: float = float("nan")


def _draw_distance(setup: Setup, moved_setup: Setup, m: str, which: Any) -> float:
    """The L2 distance of a draw's embeddings from the input's at m's positions (0: m unchanged);
    raises when the draw changed the layout."""
    if not moved_setup.spans.same_layout(setup.spans):
        raise ValueError(
            f"a {which!r} perturbation changed the layout (modality spans); stability compares explanations "
            "position by position"
        )
    where = setup.spans.masks[m].to(setup.embeds.device)[..., None]
    return float(torch.where(where, setup.embeds.float() - moved_setup.embeds.float(), 0.0).norm())


def _stability_samples(
    hooked: HookedModel,
    setup: Setup,
    base: dict[str, Explanation],
    chosen: _Explainers,
    moved_x: dict,
    moved_setup: Setup,
    key: tuple,
    input_change: float = float("nan"),
) -> list[dict]:
    """The :class:`StabilityResult` samples of one draw (``key`` = (input, m, source, kind or epsilon,
    draw); ``moved_x``/``moved_setup``: the draw's input row and setup; ``input_change``: its relative
    raw-input change, NaN for embedding-level draws); none when m's embeddings are unchanged."""
    draw = _Draw(moved_x, moved_setup, key, input_change)
    if _draw_distance(setup, moved_setup, key[1], key[3]) == 0:
        return []
    return _sample_rows(setup, base, chosen.names, draw, chosen.explain(hooked, moved_x, moved_setup))


def _sample_rows(
    setup: Setup, base: dict[str, Explanation], names: list[str], draw: _Draw, moved: dict[str, Explanation]
) -> list[dict]:
    """The samples of one draw whose m embeddings moved, from its explanations ``moved``. Each row
    carries the draw's embeddings under ``_embeds`` for the adversarial search."""
    i, m, source, which, number = draw.key
    distance = _draw_distance(setup, draw.setup, m, which)
    where = setup.spans.masks[m].to(setup.embeds.device)[..., None]
    embedding_change = distance / max(float(torch.where(where, setup.embeds.float(), 0.0).norm()), 1e-30)
    kept = int(draw.setup.logits[0].argmax()) == int(setup.logits[0].argmax())
    rows = []
    for name in names:
        for target in setup.spans.modalities:
            a, b = base[name].masked(target), moved[name].masked(target)
            change = float((a - b).norm(dim=1)[0])
            relative = change / max(float(a.norm(dim=1)[0]), 1e-30)
            rows.append(
                {
                    "input": i,
                    "explainer": name,
                    "perturbed": m,
                    "source": source,
                    "kind": which if source == "input" else source,
                    "epsilon": float(which) if source != "input" else float("nan"),
                    "draw": number,
                    "explained": target,
                    "input_distance": distance,
                    "explanation_distance": change,
                    "ratio": change / distance,
                    "explanation_change": relative,
                    "input_change": draw.input_change,
                    "embedding_change": embedding_change,
                    "ris": relative / max(draw.input_change, 1e-6),
                    "res": relative / max(embedding_change, 1e-6),
                    "kept": kept,
                    "_embeds": draw.setup.embeds,
                }
            )
    return rows


def stability_summary(samples: pd.DataFrame) -> pd.DataFrame:
    """The ``summary`` table of a :class:`StabilityResult` from its ``samples`` table."""
    if samples.empty:
        return pd.DataFrame()
    samples = samples.assign(epsilon=samples.epsilon.fillna(-1.0))
    keys = ["explainer", "perturbed", "explained", "source", "epsilon"]
    dropped = (~samples.kept).groupby([samples[k] for k in keys], sort=False).sum()
    sup = samples[samples.kept].groupby([*keys, "input"], sort=False)[["ris", "res", "ratio"]].max().reset_index()
    out = []
    for key, group in sup.groupby(keys, sort=False):
        name, m, target, source, epsilon = key
        out.append(
            {
                "explainer": name,
                "perturbed": m,
                "explained": target,
                "source": source,
                "epsilon": float("nan") if epsilon < 0 else epsilon,
                "equation": "intra (6)" if m == target else "cross (7)",
                "n_inputs": len(group),
                "n_dropped": int(dropped[key]),
                "ris_max": float(group.ris.max()),
                "ris_median": float(group.ris.median()),
                "res_max": float(group.res.max()),
                "res_median": float(group.res.median()),
                "max": float(group.ratio.max()),
                "p95": float(group.ratio.quantile(0.95)),
                "median": float(group.ratio.median()),
            }
        )
    return pd.DataFrame(out)


def circuit_faithfulness(
    hooked: HookedModel,
    inputs: Dataset,
    circuit: Any,
    ablation: str = "neutral",
    *,
    reference: Any = None,
    modality: str | None = None,
    kinds: Sequence[str] | None = None,
    random_draws: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Sufficiency and necessity of a circuit (:class:`mmlens.methods.circuits.Circuit`) with keep/remove
    interventions inside the model (:func:`mmlens.methods.circuits.intervene`), against random circuits
    matched in (component, position, head) cells (:func:`mmlens.methods.circuits.matched_random_circuit`,
    drawn per input). A circuit with edges is also evaluated as edges, through path patching
    (:func:`mmlens.methods.circuits.edge_patch`: only its sender -> receiver paths carry the ablated
    run), against as many random edges of the same kinds; this needs ablation ``"neutral"`` (the
    ablated run is the neutral input) or ``"resample"`` (``reference`` inputs).

    Returns one row per (input, source): ``source`` ``"circuit"`` or ``"random"`` (mean over draws),
    and for edge circuits ``"circuit_edges"`` and ``"random_edges"`` (``f_keep`` NaN: only removal is
    path-patched); ``cells`` (the cell count, equal for a circuit and its random matches), ``f`` (the
    predicted token's probability), ``f_keep``, ``f_remove``, ``sufficiency_gap`` (|f_keep - f|),
    ``necessity_drop`` (f - f_remove). A circuit that is the whole universe has sufficiency gap 0;
    removing it gives the fully ablated run.
    """
    from mmlens.methods.circuits import cell_count, intervene, matched_random_circuit

    generator = torch.Generator().manual_seed(seed)
    nodes = circuit.effective_nodes
    kinds = tuple(kinds or dict.fromkeys(hooked.resolve(n.hook).kind for n in nodes)) or ("attn_out", "mlp_out")
    if circuit.edges and ablation not in ("neutral", "resample"):
        raise ValueError(
            f"edges are evaluated by path patching from an ablated run: use ablation 'neutral' or 'resample', "
            f"got {ablation!r}"
        )
    rows = []
    for i, x in enumerate(tqdm(examples(hooked, inputs), desc="circuit faithfulness", disable=not progress)):
        metric = predicted_prob(hooked, x)

        def f(run, metric: Metric = metric, x: dict = x) -> float:
            return float(metric(hooked.readout_logits(run.logits, x))[0])

        randoms = [matched_random_circuit(hooked, circuit, x, generator) for _ in range(random_draws)]
        with torch.no_grad():
            base = f(hooked.run(x))
            for source, group in (("circuit", [circuit]), ("random", randoms)):
                keep = [
                    f(intervene(hooked, x, c, "keep", ablation, reference=reference, modality=modality, kinds=kinds))
                    for c in group
                ]
                remove = [
                    f(intervene(hooked, x, c, "remove", ablation, reference=reference, modality=modality))
                    for c in group
                ]
                if not group:
                    continue
                f_keep, f_remove = float(np.mean(keep)), float(np.mean(remove))
                cells = [cell_count(hooked, c, x) for c in group]
                rows.append(_circuit_row(i, source, int(np.mean(cells)), base, f_keep, f_remove))
            if circuit.edges:
                rows += _edge_rows(
                    hooked, x, i, circuit, ablation, reference, modality, random_draws, generator, metric
                )
    return pd.DataFrame(rows)


def _circuit_row(i: int, source: str, cells: int, f: float, f_keep: float, f_remove: float) -> dict:
    """One row of :func:`circuit_faithfulness`."""
    return {
        "input": i,
        "source": source,
        "cells": cells,
        "f": f,
        "f_keep": f_keep,
        "f_remove": f_remove,
        "sufficiency_gap": abs(f_keep - f),
        "necessity_drop": f - f_remove,
    }


def _edge_rows(
    hooked: HookedModel,
    x: dict,
    i: int,
    circuit: Any,
    ablation: str,
    reference: Any,
    modality: str | None,
    random_draws: int,
    generator: torch.Generator,
    metric: Metric,
) -> list[dict]:
    """The ``circuit_edges`` and ``random_edges`` rows of input ``i``: removal by path patching."""
    from mmlens.methods.circuits import edge_patch, random_edges

    if ablation == "resample":
        if reference is None:
            raise ValueError("ablation 'resample' needs reference inputs of the same layout")
        corrupted = reference
    else:
        corrupted = x
        for m in [modality] if modality else [m for m in hooked.spans(x).modalities if m in hooked.adapter.neutral]:
            corrupted = hooked.neutral(corrupted, m)
    with torch.no_grad():
        f = edge_patch(hooked, x, corrupted, metric, ())
        rows = [
            _circuit_row(
                i,
                "circuit_edges",
                len(circuit.edges),
                f,
                float("nan"),
                edge_patch(hooked, x, corrupted, metric, circuit.edges),
            )
        ]
        draws = [random_edges(hooked, circuit.edges, generator) for _ in range(random_draws)]
        removed = [edge_patch(hooked, x, corrupted, metric, d) for d in draws]
    rows.append(_circuit_row(i, "random_edges", len(circuit.edges), f, float("nan"), float(np.mean(removed))))
    return rows


@dataclass
class InteractionResult:
    """What :func:`interaction` returns.

    Attributes:
        modalities: the two modalities (a, b).
        per_input: one row per input: ``v_ab`` (f on the input), ``v_a`` (b at its neutral reference),
            ``v_b`` (a neutral), ``v_none`` (both neutral) and ``shapley_interaction`` =
            v_ab - v_a - v_b + v_none (f: the probability of the input's predicted token). Positive:
            synergy (each modality needs the other); negative: redundancy (either suffices); ~0:
            additive. ``shapley_interaction_logodds``: the same in log-odds of that token (log p -
            log(1 - p)), which does not saturate (with two classes it is the logit difference, so a
            model additive in logits has none).
        intervals: per ``space`` (``prob``, ``logodds``): the mean interaction with a bootstrap
            interval over inputs (``low``, ``high``).
        emap: Hessel & Lee's (2020) empirical multimodally-additive projection over the dataset:
            ``accuracy`` of the model's own logits and ``emap_accuracy`` of their additive
            projection against ``labels`` (the model's predictions when none are given), and
            ``gap`` = accuracy - emap_accuracy (~0 when the model is additive in a and b) with a
            bootstrap interval over inputs (``gap_low``, ``gap_high``: inputs resampled, the
            projection's means taken over the resample); None when the inputs' a positions differ.
    """

    modalities: tuple[str, str]
    per_input: pd.DataFrame
    emap: dict | None
    intervals: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def mean_interaction(self) -> float:
        """Mean Shapley interaction over the inputs."""
        return float(self.per_input.shapley_interaction.mean())


def interaction(
    hooked: HookedModel,
    inputs: Dataset,
    modalities: Sequence[str] | None = None,
    *,
    labels: Sequence[int] | Tensor | None = None,
    emap: bool = True,
    batch_size: int = 64,
    n_resamples: int = 999,
    seed: int = 0,
    progress: bool = True,
) -> InteractionResult:
    """How much two modalities interact in the model's output, per input and over a dataset.

    Shapley interaction of the two modalities as players, each either present or at its neutral
    reference embedding (per input, 3 extra variants); and the EMAP gap: the model's logits
    f(a_i, b_j) on every pair of one input's b with another's a (n^2 runs, a swapped at the fused
    embeddings, which equals swapping a's input when a is encoded separately) are projected onto
    additive functions, ``mean_j f(a_i, b_j) + mean_j f(a_j, b_i) - mean_jk f(a_j, b_k)``, and the
    accuracies compared.

    Args:
        modalities: the two modalities (default: the inputs' two modalities; an error if not two).
        labels: true labels per input for EMAP (default: the model's predictions).
    """
    items = examples(hooked, inputs)
    present = _modalities(hooked, items)
    pair = tuple(modalities or present)
    if len(pair) != 2 or any(m not in present for m in pair):
        raise ValueError(
            f"interaction takes two modalities of these inputs {present}, got {list(pair)}; pass modalities=(a, b)"
        )
    a = pair[0]
    rows, setups = [], []
    for i, x in enumerate(tqdm(items, desc="interaction", disable=not progress)):
        setup = prepare(hooked, x, None, "joint")
        setups.append(setup)
        mask_a, mask_b = (setup.spans.masks[m][0].cpu() & setup.explained[0].cpu() for m in pair)
        v_a, v_b, v_none = masked_values(hooked, x, setup, [mask_b, mask_a, mask_a | mask_b], batch_size).tolist()
        v_ab = float(setup.value[0])
        odds = replace(setup, metric=prediction_metric(setup.logits, "logodds"))
        odds.value = odds.metric(setup.logits)
        l_a, l_b, l_none = masked_values(hooked, x, odds, [mask_b, mask_a, mask_a | mask_b], batch_size).tolist()
        l_ab = float(odds.value[0])
        rows.append(
            {
                "input": i,
                "v_ab": v_ab,
                "v_a": v_a,
                "v_b": v_b,
                "v_none": v_none,
                "shapley_interaction": v_ab - v_a - v_b + v_none,
                "shapley_interaction_logodds": l_ab - l_a - l_b + l_none,
            }
        )
    per_input = pd.DataFrame(rows)
    emap_result = _emap(hooked, items, setups, a, labels, batch_size, progress, n_resamples, seed) if emap else None
    return InteractionResult(pair, per_input, emap_result, _interaction_intervals(per_input, n_resamples, seed))


def _interaction_intervals(per_input: pd.DataFrame, n_resamples: int, seed: int) -> pd.DataFrame:
    """Mean Shapley interaction in probability and log-odds space with bootstrap intervals over inputs."""
    out = []
    for space, column in (("prob", "shapley_interaction"), ("logodds", "shapley_interaction_logodds")):
        values = per_input[column].to_numpy()
        if len(values) < 2:
            out.append({"space": space, "mean": float(values.mean()), "low": np.nan, "high": np.nan, "n_inputs": 1})
            continue
        interval = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
        out.append(
            {
                "space": space,
                "mean": interval.estimate,
                "low": interval.low,
                "high": interval.high,
                "n_inputs": len(values),
                "interval": interval.method,
            }
        )
    return pd.DataFrame(out)


def _emap(
    hooked: HookedModel,
    items: list[dict],
    setups: list,
    a: str,
    labels,
    batch_size: int,
    progress: bool,
    n_resamples: int = 999,
    seed: int = 0,
) -> dict | None:
    masks = [s.spans.masks[a][0].cpu() for s in setups]
    if len(items) < 2 or any(not torch.equal(m, masks[0]) for m in masks):
        return None
    at = masks[0].to(setups[0].embeds.device)[None, :, None]
    logits = []  # logits[i][j]: input i with a taken from input j
    with torch.no_grad():
        for i, (x, setup) in enumerate(tqdm(list(zip(items, setups)), desc="EMAP", disable=not progress)):
            row = []
            for start in range(0, len(items), batch_size):
                donors = torch.cat([s.embeds for s in setups[start : start + batch_size]])
                mixed = torch.where(at, donors, setup.embeds)
                row.append(with_embeds(hooked, x, setup.point, mixed, lambda out: out).float().cpu())
            logits.append(torch.cat(row))
    f = torch.stack(logits)  # Float[n, n, vocab]
    own = torch.diagonal(f).T.argmax(-1)
    truth = own if labels is None else torch.as_tensor(labels).long().cpu()
    correct = (own == truth).double().numpy()

    def gap(counts: np.ndarray) -> np.ndarray:
        """Float[R]: accuracy - EMAP accuracy with input j drawn counts[r, j] times (the projection's
        means weighted alike)."""
        out = []
        for w in counts:
            p = torch.as_tensor(w / w.sum(), dtype=f.dtype)
            projection = (
                (f * p[None, :, None]).sum(1)
                + (f * p[:, None, None]).sum(0)
                - (f * (p[:, None] * p[None, :])[..., None]).sum((0, 1))
            )
            emap_correct = (projection.argmax(-1) == truth).double().numpy()
            out.append(weighted_mean(correct - emap_correct, w)[0])
        return np.array(out)

    value, low, high = cluster_bootstrap(np.arange(len(items)), gap, n_resamples=n_resamples, seed=seed)
    accuracy = float(correct.mean())
    return {
        "accuracy": accuracy,
        "emap_accuracy": accuracy - value,
        "gap": value,
        "gap_low": low,
        "gap_high": high,
        "n": len(items),
        "labels": "given" if labels is not None else "model predictions",
    }


def _random_top(members: Mapping[str, Tensor], group: list[str], k: float, generator: torch.Generator) -> Tensor:
    """Bool[n]: a random ``ceil(k * m)`` entries of each modality of ``group`` (``members``: modality -> Bool[n])."""
    out = torch.zeros_like(next(iter(members.values())))
    for n in group:
        out |= _random_global(members[n], k, generator)
    return out


def _mode_setup(hooked: HookedModel, x: dict, joint: Setup, mode: str) -> Setup:
    """The setup of an explanation in ``mode``: ``joint`` itself, or a unimodal one with its metric (of
    the same embeddings when ``joint`` is an embedding-level variant)."""
    if mode == "joint":
        return joint
    own = prepare(hooked, x, joint.metric, mode)
    return variant_setup(hooked, x, own, joint.embeds) if joint.edited else own


def areas(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (scope, source): the areas under the mean faithfulness curves over k (see :class:`FaithfulnessResult`)."""
    if curves.empty:
        return pd.DataFrame()
    mean = (
        curves.groupby(["scope", "source", "k"], sort=False)[["sufficiency_gap", "necessity_drop"]].mean().reset_index()
    )
    out = []
    for (scope, source), group in mean.groupby(["scope", "source"], sort=False):
        group = group.sort_values("k")
        k = group.k.to_numpy()
        out.append(
            {
                "scope": scope,
                "source": source,
                "aoc_sufficiency_gap": float(np.trapezoid(group.sufficiency_gap.to_numpy(), k))
                if len(k) > 1
                else float("nan"),
                "auc_necessity_drop": float(np.trapezoid(group.necessity_drop.to_numpy(), k))
                if len(k) > 1
                else float("nan"),
            }
        )
    return pd.DataFrame(out)


__all__ = [
    "Dataset",
    "FaithfulnessResult",
    "GrangerResult",
    "LEVELS",
    "RANDOM_TOP_K",
    "REFERENCES",
    "InteractionResult",
    "StabilityResult",
    "areas",
    "circuit_faithfulness",
    "examples",
    "explanation_distance",
    "faithfulness",
    "faithfulness_intervals",
    "granger",
    "input_units",
    "granger_calibration",
    "granger_summary",
    "interaction",
    "js_divergence",
    "necessity_areas",
    "kappa_lambda",
    "stability",
    "stability_summary",
]
