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
  against random explanations of the same size.

Every intervention acts where the modalities enter the LM (``fusion.embeds`` / ``lm.embed``), so
text, image and graph positions are treated alike, and variants are evaluated in batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.core.wrapper import HookedModel
from mmlens.methods.explainers import (
    Explanation,
    Setup,
    check_method,
    explain,
    explain_row,
    masked_values,
    predicted_prob,
    prepare,
    with_embeds,
)
from mmlens.methods.patching import Metric

if TYPE_CHECKING:
    from mmlens.metrics.perturb import Perturbed

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
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between the softmaxes of Float[b, vocab] logits."""
    p, q = p_logits.float().softmax(-1), q_logits.float().softmax(-1)
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(
            -1
        )

    return (kl(p, m) + kl(q, m)) / 2


def explanation_distance(a: Explanation, b: Explanation, modality: str, kind: str = "tv") -> Tensor:
    """Float[b]: how much the explanation of ``modality`` changed from ``a`` to ``b`` (same layout).

    ``"tv"``: total variation between the two |score| distributions over the modality's positions
    (in [0, 1]; scale-free). ``"relative_l2"``: ||s_a - s_b|| / ||s_a|| on those positions.
    """
    if kind == "tv":
        return (a.distribution(modality) - b.distribution(modality)).abs().sum(1) / 2
    if kind == "relative_l2":
        diff = (a.masked(modality) - b.masked(modality)).norm(dim=1)
        return diff / a.masked(modality).norm(dim=1).clamp_min(1e-30)
    raise ValueError(f"unknown explanation distance {kind!r}; use 'tv' or 'relative_l2'")


@dataclass
class GrangerResult:
    """What :func:`granger` returns.

    Attributes:
        influence: one row per (input, ablated modality m): ``delta_js`` (Delta_m, JS divergence of
            the final-position distributions, nats), ``delta_prob`` (drop of the predicted token's
            probability).
        explanations: one row per (input, explainer, m, explained modality n != m): ``delta``
            (delta_{m->n}, :func:`explanation_distance`), ``importance_m`` (the explainer's share of
            score mass on m for the unablated input), and Delta_m.
        summary: one row per (explainer, m, n): ``kappa`` (the largest kappa with delta >= kappa *
            Delta - lambda for ``fraction`` of inputs at lambda <= ``tolerance``), ``lambda`` (the
            smallest lambda at that kappa), ``spearman_importance`` (rank correlation over inputs
            of Delta_m and importance_m), ``spearman_delta`` (of Delta_m and delta).
        violations: the inputs that break the relation most: ``hidden_dependency`` (Delta_m large,
            explanation unmoved) and ``over_credit`` (Delta_m near zero, importance on m high).
        distance, fraction, tolerance: the settings used.
    """

    influence: pd.DataFrame
    explanations: pd.DataFrame
    summary: pd.DataFrame
    violations: pd.DataFrame
    distance: str
    fraction: float
    tolerance: float


def kappa_lambda(
    delta_out: np.ndarray, delta_expl: np.ndarray, fraction: float = 0.9, tolerance: float = 0.05
) -> tuple[float, float]:
    """The largest kappa such that ``delta_expl >= kappa * delta_out - lambda`` holds for
    ``fraction`` of the inputs with some lambda <= ``tolerance``, and the smallest such lambda.

    lambda(kappa) = max(0, quantile_fraction(kappa * delta_out - delta_expl)) is nondecreasing in
    kappa (Delta >= 0), so kappa is found by bisection.
    """
    delta_out, delta_expl = np.asarray(delta_out, float), np.asarray(delta_expl, float)

    def lam(kappa: float) -> float:
        return max(0.0, float(np.quantile(kappa * delta_out - delta_expl, fraction)))

    if not len(delta_out) or lam(0.0) > tolerance:
        return 0.0, lam(0.0) if len(delta_out) else float("nan")
    high = 1.0
    while lam(high) <= tolerance and high < 1e9:
        high *= 2
    if lam(high) <= tolerance:
        return float("inf"), lam(high)
    low = 0.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if lam(mid) <= tolerance else (low, mid)
    return low, lam(low)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = pd.Series(list(a), dtype=float), pd.Series(list(b), dtype=float)
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(a.rank().corr(b.rank()))


def granger(
    hooked: HookedModel,
    inputs: Dataset,
    explainers: Sequence[str] = ("integrated_gradients",),
    *,
    mode: str = "joint",
    distance: str = "tv",
    fraction: float = 0.9,
    tolerance: float = 0.05,
    options: Mapping[str, dict] | None = None,
    progress: bool = True,
) -> GrangerResult:
    """Granger-style modality influence over the rows of ``inputs`` (a dataset).

    For each row x and modality m: x_m = x with m replaced by its neutral reference. Each explainer
    explains the same quantity on x and on x_m: the probability of x's predicted token.

    Args:
        explainers: names from :data:`mmlens.methods.explainers.EXPLAINERS`.
        mode: explainer mode (``"joint"``; or ``"unimodal"``: each modality n explained alone).
        distance: explanation distance (:func:`explanation_distance`).
        options: per-explainer keyword options, e.g. ``{"integrated_gradients": {"steps": 16}}``.
    """
    items = examples(hooked, inputs)
    present = _modalities(hooked, items)
    modalities = [m for m in present if m in hooked.adapter.neutral]
    if len(modalities) < 1:
        raise ValueError(
            f"no modality of these inputs ({present}) has a neutral reference in adapter {hooked.adapter.name!r}"
        )
    options = dict(options or {})
    influence, rows = [], []
    for i, x in enumerate(tqdm(items, desc="granger", disable=not progress)):
        metric = predicted_prob(hooked, x)
        with torch.no_grad():
            logits = hooked.readout_logits(hooked.run(x).logits, x)
        ablated = {m: hooked.neutral(x, m) for m in modalities}
        for m, x_m in ablated.items():
            with torch.no_grad():
                logits_m = hooked.readout_logits(hooked.run(x_m).logits, x_m)
            influence.append(
                {
                    "input": i,
                    "modality": m,
                    "delta_js": float(js_divergence(logits, logits_m)[0]),
                    "delta_prob": float(metric(logits)[0] - metric(logits_m)[0]),
                }
            )
        for name in explainers:
            kwargs = options.get(name, {})
            base = _explain_mode(hooked, x, name, mode, metric, kwargs)
            for m, x_m in ablated.items():
                moved = _explain_mode(hooked, x_m, name, mode, metric, kwargs)
                for n in modalities:
                    if n == m:
                        continue
                    rows.append(
                        {
                            "input": i,
                            "explainer": name,
                            "ablated": m,
                            "explained": n,
                            "delta": float(explanation_distance(base[n], moved[n], n, distance)[0]),
                            "importance_m": float(base[m].importance()[m][0]) if mode == "joint" else float("nan"),
                        }
                    )
    influence_df = pd.DataFrame(influence)
    expl = pd.DataFrame(rows)
    if not expl.empty:
        expl = expl.merge(influence_df.rename(columns={"modality": "ablated"}), on=["input", "ablated"])
    return GrangerResult(influence_df, expl, *granger_summary(expl, fraction, tolerance), distance, fraction, tolerance)


def _explain_mode(hooked: HookedModel, x: dict, name: str, mode: str, metric, kwargs: dict) -> dict[str, Explanation]:
    """Modality -> the explanation that covers it (one joint explanation, or one per modality)."""
    modalities = hooked.spans(x).modalities
    if mode == "joint":
        e = explain(hooked, x, name, mode="joint", metric=metric, **kwargs)
        return {m: e for m in modalities}
    if mode == "unimodal":
        return {m: explain(hooked, x, name, mode=m, metric=metric, **kwargs) for m in modalities}
    raise ValueError(f"mode must be 'joint' or 'unimodal', got {mode!r}")


def granger_summary(expl: pd.DataFrame, fraction: float, tolerance: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``summary`` and ``violations`` tables of a :class:`GrangerResult` from its ``explanations`` table."""
    if expl.empty:
        return pd.DataFrame(), pd.DataFrame()
    summary, violations = [], []
    for (name, m, n), group in expl.groupby(["explainer", "ablated", "explained"], sort=False):
        kappa, lam = kappa_lambda(group.delta_js.to_numpy(), group.delta.to_numpy(), fraction, tolerance)
        summary.append(
            {
                "explainer": name,
                "ablated": m,
                "explained": n,
                "n_inputs": len(group),
                "kappa": kappa,
                "lambda": lam,
                "spearman_importance": _spearman(group.delta_js, group.importance_m),
                "spearman_delta": _spearman(group.delta_js, group.delta),
                "mean_delta_js": group.delta_js.mean(),
                "mean_delta": group.delta.mean(),
            }
        )
        scale_out = max(group.delta_js.max(), 1e-30)
        scale_expl = max(group.delta.max(), 1e-30)
        hidden = group.delta_js / scale_out - group.delta / scale_expl
        over = group.importance_m - group.delta_js / scale_out
        for kind, score in (("hidden_dependency", hidden), ("over_credit", over)):
            worst = score.idxmax()
            if np.isfinite(score[worst]) and score[worst] > 0:
                violations.append(
                    {
                        "explainer": name,
                        "ablated": m,
                        "explained": n,
                        "kind": kind,
                        "input": int(group.input[worst]),
                        "score": float(score[worst]),
                        "delta_js": float(group.delta_js[worst]),
                        "delta": float(group.delta[worst]),
                        "importance_m": float(group.importance_m[worst]),
                    }
                )
    return pd.DataFrame(summary), pd.DataFrame(violations)


@dataclass
class FaithfulnessResult:
    """What :func:`faithfulness` returns.

    Attributes:
        curves: one row per (input, scope, k, source): ``scope`` a modality or ``"joint"`` (every
            modality's top-k at once), ``source`` ``"explanation"`` or ``"random"`` (mean over
            draws), ``f`` the metric on the input, ``f_keep``, ``f_remove``, ``sufficiency_gap``
            (|f_keep - f|), ``necessity_drop`` (f - f_remove).
        areas: per (scope, source): areas under the mean curves over k in [0, 1] (trapezoid):
            ``aoc_sufficiency_gap`` (lower is better) and ``auc_necessity_drop`` (higher is better).
    """

    curves: pd.DataFrame
    areas: pd.DataFrame
    method: str


def faithfulness(
    hooked: HookedModel,
    inputs: Dataset,
    explainer: str = "integrated_gradients",
    *,
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    random_draws: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    options: Mapping[str, Any] | None = None,
    explanations: Sequence[Explanation] | None = None,
    progress: bool = True,
) -> FaithfulnessResult:
    """Sufficiency and necessity of an explainer's top-k positions per modality and jointly.

    keep_k: every explained position outside the top-k fraction of its modality takes its neutral
    reference embedding; remove_k: the top-k positions do. The metric is the probability of each
    input's predicted token. ``explanations`` (one per row, from :func:`mmlens.explain`) skips
    explaining.
    """
    items = examples(hooked, inputs)
    fractions = sorted({float(k) for k in fractions})
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    generator = torch.Generator().manual_seed(seed)
    if explanations is not None and len(explanations) != len(items):
        raise ValueError(f"got {len(explanations)} explanations for {len(items)} inputs")
    options = dict(options or {})
    mode = options.pop("mode", "joint")
    check_method(explainer)
    rows = []
    for i, x in enumerate(tqdm(items, desc=f"faithfulness ({explainer})", disable=not progress)):
        setup = prepare(hooked, x, None, "joint")
        if explanations is not None:
            e = explanations[i]
        else:
            own = setup if mode == "joint" else prepare(hooked, x, setup.metric, mode)
            e = explain_row(hooked, own, x, explainer, mode, options)
        modalities = setup.spans.modalities
        masks, labels = [], []
        for scope in modalities + (["joint"] if len(modalities) > 1 else []):
            members = modalities if scope == "joint" else [scope]
            scope_mask = torch.zeros_like(setup.explained[0].cpu())
            for n in members:
                scope_mask |= setup.spans.masks[n][0].cpu()
            for k in fractions:
                top = torch.zeros_like(scope_mask)
                for n in members:
                    top |= e.top_mask(n, k)[0]
                draws = [_random_top(setup.spans, members, k, generator) for _ in range(random_draws)]
                for source, chosen in (("explanation", [top]), ("random", draws)):
                    for d, mask in enumerate(chosen):
                        masks += [scope_mask & ~mask, mask]
                        labels += [(scope, k, source, d, "keep"), (scope, k, source, d, "remove")]
        values = masked_values(hooked, x, setup, masks, batch_size).tolist()
        f = float(setup.value[0])
        table = pd.DataFrame(
            [(*label, v) for label, v in zip(labels, values)],
            columns=["scope", "k", "source", "draw", "which", "value"],
        )
        wide = table.pivot_table(index=["scope", "k", "source", "draw"], columns="which", values="value").reset_index()
        wide = wide.groupby(["scope", "k", "source"], sort=False)[["keep", "remove"]].mean().reset_index()
        for r in wide.itertuples(index=False):
            rows.append(
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
            )
    curves = pd.DataFrame(rows)
    return FaithfulnessResult(curves, areas(curves), explainer)


@dataclass
class StabilityResult:
    """What :func:`stability` returns.

    Attributes:
        samples: one row per (input, explainer, perturbed modality m, kind, draw, explained
            modality n): ``input_distance`` (L2 in the LM's input embeddings at m's positions,
            :func:`mmlens.metrics.perturb.input_distance`), ``explanation_distance`` (L2 between the raw
            scores at n's positions), ``ratio`` (their quotient), ``kept`` (whether the prediction
            was unchanged; only kept samples enter the summary).
        summary: one row per (explainer, m, n): ``equation`` ("intra (6)" for m == n, "cross (7)"
            otherwise), ``n_kept``/``n_dropped``, and the ratio's ``max``, ``p95`` and ``median``.
        skipped: modalities that could not be perturbed, with the reason.
    """

    samples: pd.DataFrame
    summary: pd.DataFrame
    skipped: dict[str, str]


def stability(
    hooked: HookedModel,
    inputs: Dataset,
    explainers: Sequence[str] = ("integrated_gradients",),
    *,
    modalities: Sequence[str] | None = None,
    kinds: Mapping[str, Sequence[str]] | None = None,
    n: int = 4,
    scale: Mapping[str, float] | None = None,
    seed: int = 0,
    options: Mapping[str, dict] | None = None,
    progress: bool = True,
) -> StabilityResult:
    """Unified stability: Lipschitz ratios ||E(x) - E(x')|| / ||x - x'|| under small
    meaning-preserving perturbations of each modality m (:func:`mmlens.metrics.perturb.perturb`), for the
    explanation of every modality n (Eq. 6 for n = m, Eq. 7 for n != m).

    A perturbation is kept only if the predicted final-position token is unchanged (argmax of the
    logits); both explanations explain the probability of the original prediction.

    Args:
        modalities: which modalities to perturb (default: every one of the inputs that has kinds).
        kinds: modality -> perturbation kinds (default: every kind the model's adapter declares).
        n: draws per kind.
    """
    from mmlens.metrics.perturb import PERTURBATIONS, perturb

    items = examples(hooked, inputs)
    present = _modalities(hooked, items)
    targets = [m for m in (modalities or present) if m in PERTURBATIONS]
    unknown = [m for m in (modalities or []) if m not in present]
    if unknown:
        raise ValueError(f"modalities {unknown} are not in these inputs; they have {present}")
    chosen = _Explainers.of(explainers, options)
    rows, skipped = [], {}
    for i, x in enumerate(tqdm(items, desc="stability", disable=not progress)):
        setup = prepare(hooked, x, None, "joint")
        base = chosen.explain(hooked, x, setup)
        for m in targets:
            try:
                perturbed = perturb(hooked, x, m, (kinds or {}).get(m), n=n, scale=scale, seed=seed + i)
            except ValueError as err:
                skipped[m] = str(err)
                continue
            for draw, p in enumerate(perturbed):
                rows += _stability_samples(hooked, setup, base, chosen, p, i, draw)
    samples = pd.DataFrame(rows)
    return StabilityResult(samples, stability_summary(samples), skipped)


@dataclass
class _Explainers:
    """Explainers by name, each with its mode (the ``"mode"`` of its options, default ``"joint"``) and
    its other keyword options."""

    names: Sequence[str]
    modes: dict[str, str]
    options: dict[str, dict]

    @classmethod
    def of(cls, names: Sequence[str], options: Mapping[str, dict] | None) -> _Explainers:
        """The explainers ``names`` with their per-explainer ``options`` (names checked)."""
        own = {name: dict((options or {}).get(name, {})) for name in names}
        modes = {name: own[name].pop("mode", "joint") for name in names}
        for name in names:
            check_method(name)
        return cls(names, modes, own)

    def explain(self, hooked: HookedModel, x: dict, setup: Setup) -> dict[str, Explanation]:
        """Each explainer's explanation of input row ``x`` (``setup``: its joint :func:`prepare`)."""
        return {
            name: explain_row(
                hooked, _mode_setup(hooked, x, setup, self.modes[name]), x, name, self.modes[name], self.options[name]
            )
            for name in self.names
        }


def _stability_samples(
    hooked: HookedModel,
    setup: Setup,
    base: dict[str, Explanation],
    chosen: _Explainers,
    p: Perturbed,
    input_index: int,
    draw: int,
) -> list[dict]:
    """The :class:`StabilityResult` samples of draw ``draw`` of one perturbation of input row ``input_index``
    (``setup``: the row's joint setup, ``base``: its explanations); none when ``p`` leaves the perturbed
    modality's embeddings unchanged."""
    if not hooked.spans(p.inputs).same_layout(setup.spans):
        raise ValueError(
            f"a {p.kind!r} perturbation changed the layout (modality spans); stability "
            "compares explanations position by position"
        )
    moved_setup = prepare(hooked, p.inputs, setup.metric, "joint")
    where = setup.spans.masks[p.modality].to(setup.embeds.device)[..., None]
    distance = float(torch.where(where, setup.embeds.float() - moved_setup.embeds.float(), 0.0).norm())
    if distance == 0:
        return []
    kept = int(moved_setup.logits[0].argmax()) == int(setup.logits[0].argmax())
    moved = chosen.explain(hooked, p.inputs, moved_setup)
    rows = []
    for name in chosen.names:
        for target in setup.spans.modalities:
            change = float((base[name].masked(target) - moved[name].masked(target)).norm(dim=1)[0])
            rows.append(
                {
                    "input": input_index,
                    "explainer": name,
                    "perturbed": p.modality,
                    "kind": p.kind,
                    "draw": draw,
                    "explained": target,
                    "input_distance": distance,
                    "explanation_distance": change,
                    "ratio": change / distance,
                    "kept": kept,
                }
            )
    return rows


def stability_summary(samples: pd.DataFrame) -> pd.DataFrame:
    """The ``summary`` table of a :class:`StabilityResult` from its ``samples`` table."""
    if samples.empty:
        return pd.DataFrame()
    out = []
    for (name, m, target), group in samples.groupby(["explainer", "perturbed", "explained"], sort=False):
        kept = group[group.kept].ratio
        out.append(
            {
                "explainer": name,
                "perturbed": m,
                "explained": target,
                "equation": "intra (6)" if m == target else "cross (7)",
                "n_kept": len(kept),
                "n_dropped": int((~group.kept).sum()),
                "max": float(kept.max()) if len(kept) else float("nan"),
                "p95": float(kept.quantile(0.95)) if len(kept) else float("nan"),
                "median": float(kept.median()) if len(kept) else float("nan"),
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
    interventions inside the model (:func:`mmlens.methods.circuits.intervene`), against random circuits with
    as many components drawn from the same universe.

    Returns one row per (input, source): ``source`` ``"circuit"`` or ``"random"`` (mean over draws),
    ``f`` (the predicted token's probability), ``f_keep``, ``f_remove``, ``sufficiency_gap``
    (|f_keep - f|), ``necessity_drop`` (f - f_remove). A circuit that is the whole universe has
    sufficiency gap 0; removing it gives the fully ablated run.
    """
    from mmlens.methods.circuits import Circuit, components, intervene

    generator = torch.Generator().manual_seed(seed)
    nodes = circuit.effective_nodes
    kinds = tuple(kinds or dict.fromkeys(hooked.resolve(n.hook).kind for n in nodes)) or ("attn_out", "mlp_out")
    universe = components(hooked, kinds)
    randoms = [
        Circuit(tuple(universe[j] for j in torch.randperm(len(universe), generator=generator)[: len(nodes)]))
        for _ in range(random_draws)
    ]
    rows = []
    for i, x in enumerate(tqdm(examples(hooked, inputs), desc="circuit faithfulness", disable=not progress)):
        metric = predicted_prob(hooked, x)

        def f(run, metric: Metric = metric, x: dict = x) -> float:
            return float(metric(hooked.readout_logits(run.logits, x))[0])

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
                rows.append(
                    {
                        "input": i,
                        "source": source,
                        "f": base,
                        "f_keep": f_keep,
                        "f_remove": f_remove,
                        "sufficiency_gap": abs(f_keep - base),
                        "necessity_drop": base - f_remove,
                    }
                )
    return pd.DataFrame(rows)


@dataclass
class InteractionResult:
    """What :func:`interaction` returns.

    Attributes:
        modalities: the two modalities (a, b).
        per_input: one row per input: ``v_ab`` (f on the input), ``v_a`` (b at its neutral reference),
            ``v_b`` (a neutral), ``v_none`` (both neutral) and ``shapley_interaction`` =
            v_ab - v_a - v_b + v_none (f: the probability of the input's predicted token). Positive:
            synergy (each modality needs the other); negative: redundancy (either suffices); ~0:
            additive.
        emap: Hessel & Lee's (2020) empirical multimodally-additive projection over the dataset:
            ``accuracy`` of the model's own logits and ``emap_accuracy`` of their additive
            projection against ``labels`` (the model's predictions when none are given), and
            ``gap`` = accuracy - emap_accuracy (~0 when the model is additive in a and b); None
            when the inputs' a positions differ.
    """

    modalities: tuple[str, str]
    per_input: pd.DataFrame
    emap: dict | None

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
        rows.append(
            {
                "input": i,
                "v_ab": v_ab,
                "v_a": v_a,
                "v_b": v_b,
                "v_none": v_none,
                "shapley_interaction": v_ab - v_a - v_b + v_none,
            }
        )
    return InteractionResult(
        pair, pd.DataFrame(rows), _emap(hooked, items, setups, a, labels, batch_size, progress) if emap else None
    )


def _emap(
    hooked: HookedModel, items: list[dict], setups: list, a: str, labels, batch_size: int, progress: bool
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
    projection = f.mean(1) + f.mean(0) - f.mean((0, 1))
    own = torch.diagonal(f).T.argmax(-1)
    truth = own if labels is None else torch.as_tensor(labels).long().cpu()
    accuracy = float((own == truth).float().mean())
    emap_accuracy = float((projection.argmax(-1) == truth).float().mean())
    return {
        "accuracy": accuracy,
        "emap_accuracy": emap_accuracy,
        "gap": accuracy - emap_accuracy,
        "n": len(items),
        "labels": "given" if labels is not None else "model predictions",
    }


def _random_top(spans, members: list[str], k: float, generator: torch.Generator) -> Tensor:
    """Bool[seq]: a random ``ceil(k * n)`` positions of each member modality (row 0)."""
    out = torch.zeros(spans.valid.shape[1], dtype=torch.bool)
    for n in members:
        positions = spans.masks[n][0].cpu().nonzero()[:, 0]
        count = int(np.ceil(k * len(positions) - 1e-9))
        out[positions[torch.randperm(len(positions), generator=generator)[:count]]] = True
    return out


def _mode_setup(hooked: HookedModel, x: dict, joint, mode: str):
    """The setup of an explanation in ``mode``: ``joint`` itself, or a unimodal one with its metric."""
    return joint if mode == "joint" else prepare(hooked, x, joint.metric, mode)


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
    "InteractionResult",
    "StabilityResult",
    "areas",
    "circuit_faithfulness",
    "examples",
    "explanation_distance",
    "faithfulness",
    "granger",
    "granger_summary",
    "interaction",
    "js_divergence",
    "kappa_lambda",
    "stability",
    "stability_summary",
]
