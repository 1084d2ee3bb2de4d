"""The synthetic benchmark: explainers scored against position-level ground truth, as a preregistered
experiment whose claims can fail.

    python -m mmlens.analyses.synthetic_benchmark [--out DIR] [--quick] [--tasks a,b] [--substitute-random]
        [--workers N] [--executor ray [--ray-address ADDR]] [--threads 1]

For each task (the image + text tasks of :mod:`mmlens.data.tasks` on a
:class:`mmlens.models.FusionTransformer`, the graph + text tasks of :mod:`mmlens.data.graph_tasks` on a
:class:`mmlens.models.graph_text.GraphTextFusion`) and each model seed of the preregistration
(``analyses/configs/benchmark_prereg.toml``), a model is trained (or loaded from the artefact store:
every run reuses the same models). On held-out inputs:

- every explainer of the preregistration (8 distinct ones and the controls random, constant,
  inverted) explains each input jointly; its signed scores are compared with the position-level truth
  (the key patches and words, and the graph tokens that encode the target node's neighbourhood:
  :meth:`mmlens.data.tasks.SyntheticTask.key_positions`) by a per-input AUROC; two explainers with
  identical scores on every input are an error;
- unimodal explanations (each modality explained with the other at its input) give the modality
  balance, and the Shapley interaction of the two modalities is measured per input;
- the faithfulness margin (joint-scope necessity area minus random top-k,
  :func:`mmlens.metrics.desiderata.necessity_areas`: every explainer of an input in one batched pass)
  scores each explainer without the truth; Granger calibration and relative stability score the
  preregistered explainers and controls.

Claims, each decided by the test the preregistration names (:mod:`mmlens.metrics.stats`):
(a) unimodal explanations miss synergy (AUROC over models, synergistic vs additive and redundant);
(b) attention misattributes (paired position-AUROC differences to occlusion and patching);
(c) the desiderata rank explainers as the truth does (Friedman gate, permutation test of Spearman);
(d) Granger: occlusion's explanation changes track the output changes, better than the random control;
(e) stability: occlusion is more stable than the random control (relative embedding stability).

``benchmark.json`` gets the preregistration's SHA-256 before any result; then seeds, inputs per task,
every verdict with its statistic and interval or p-value, and every table cell with a bootstrap
interval, controls included. Each (task, seed) unit is kept in ``parts/<hash>.jsonl``
(:class:`mmlens.runs.record.Record`): a rerun resumes, with a progress bar over units. Units run in
this process, in ``--workers`` forked processes, or as Ray tasks (``--executor ray``, through
:class:`mmlens.runs.executors.RayExecutor`); each unit runs with ``--threads`` torch threads, so the
numbers are the same wherever it runs. The last line is ``benchmark_seconds=<s>``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomllib
import torch
from scipy.stats import friedmanchisquare
from torch import Tensor
from tqdm.auto import tqdm

import mmlens
from mmlens.data.graph_tasks import GRAPH_TASKS
from mmlens.data.tasks import TASKS, SyntheticTask, truth_mask
from mmlens.methods.explainers import Explanation, Setup, explain, explain_row, prepare, register_explainer, with_embeds
from mmlens.metrics.desiderata import RANDOM_TOP_K, granger, interaction, necessity_areas, stability
from mmlens.metrics.stats import (
    Interval,
    auc,
    auroc,
    auroc_difference,
    bootstrap_ci,
    holm,
    permutation_test,
    spearman,
    verdict,
)
from mmlens.runs.executors import Executor, RayExecutor
from mmlens.runs.record import Record
from mmlens.store import atomic_write, config_hash, versions
from mmlens.training.classifier import TrainedModel
from mmlens.training.fusion import train_fusion
from mmlens.training.graph_text import train_graph_text

PREREG = Path(__file__).resolve().parent / "configs" / "benchmark_prereg.toml"
"""The preregistration: every threshold, test and verdict rule."""


def gradient_norm(hooked: mmlens.HookedModel, inputs: dict, metric: Any, setup: Setup) -> Tensor:
    """Saliency: the L2 norm over the embedding of the metric's gradient at each position, Float[1, seq]
    (unsigned: it says how sensitive, not which way)."""
    embeds = setup.embeds.detach().clone().requires_grad_(True)
    value = with_embeds(hooked, inputs, setup.point, embeds, metric, grad=True).sum()
    (grad,) = torch.autograd.grad(value, embeds)
    return grad.norm(dim=-1)


register_explainer("gradient_norm", gradient_norm, embeds_only=True, overwrite=True)


@dataclass(frozen=True)
class Spec:
    """One explainer of the benchmark: its reported name, the registered method and its options."""

    name: str
    method: str
    options: dict


def load_prereg(path: Path = PREREG) -> tuple[dict, str]:
    """The preregistration and the SHA-256 (hex) of its bytes."""
    data = Path(path).read_bytes()
    return tomllib.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()


def specs(prereg: dict, substitute_random: bool = False) -> list[Spec]:
    """The explainers and controls; ``substitute_random``: each replaced by the random control with
    its own seed (the null check of claim (c))."""
    rows = prereg["explainers"]["methods"] + prereg["explainers"]["controls"]
    if substitute_random:
        return [Spec(name, "random", {"seed": i + 1}) for i, (name, _, _) in enumerate(rows)]
    return [Spec(name, method, dict(options)) for name, method, options in rows]


def duplicates(scores: dict[str, list[Tensor]]) -> list[tuple[str, str]]:
    """Pairs of explainers whose scores (one Float[seq] per input) are identical on every input."""
    names = list(scores)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if all(torch.equal(x.nan_to_num(-1e30), y.nan_to_num(-1e30)) for x, y in zip(scores[a], scores[b]))
    ]


def position_auroc(scores: Tensor, truth: Tensor) -> float:
    """AUROC of the signed scores Float[seq] separating the key positions (``truth`` Bool[seq]) from
    the other scored positions (NaN = not scored); NaN when either group is empty."""
    scored = ~scores.isnan()
    return auc(scores[scored & truth].numpy(), scores[scored & ~truth].numpy())


def _share(e: Explanation, modality: str) -> float:
    """``modality``'s share of the |score| mass of a one-row explanation."""
    return float(e.importance()[modality][0]) if modality in e.modalities else float("nan")


def _explain_input(
    hm: mmlens.HookedModel, x: dict, setup: Setup, truth: Tensor, chosen: list[Spec]
) -> tuple[list[dict], dict]:
    """Joint explanations of one input (all from its one :func:`prepare`): per explainer a row
    (position AUROC, share of the first modality, its uniform share) and the explanations by name."""
    spans = setup.spans
    first = spans.modalities[0]
    uniform = float(spans.masks[first][0].sum()) / max(float(spans.valid[0].sum()), 1.0)
    rows, found = [], {}
    for spec in chosen:
        e = explain_row(hm, setup, x, spec.method, "joint", spec.options)
        found[spec.name] = e
        rows.append(
            {
                "explainer": spec.name,
                "position_auroc": position_auroc(e.scores[0], truth),
                "share_first": _share(e, first),
                "uniform_share_first": uniform,
                "first_modality": first,
                "converged": bool(all(e.info.get("converged", [True]))),
            }
        )
    return rows, found


def _balance(hm: mmlens.HookedModel, x: dict, method: str, options: dict) -> float:
    """Modality balance from unimodal explanations: min over modalities of the |mass| share, each
    modality explained with the others at their input values (0: one modality only, 0.5: even)."""
    masses = [float(explain(hm, x, method, mode=m, **options).masked(m).abs().sum()) for m in hm.spans(x).modalities]
    return min(masses) / max(sum(masses), 1e-30)


def granger_part(hm: mmlens.HookedModel, items: list[dict], prereg: dict) -> dict:
    """Per explainer of the preregistration's Granger section: the two-sided calibration of one model,
    Spearman over (input, ablated m, explained n) of the explanation change delta against the output
    change Delta_m (JS), self and cross terms together (:func:`mmlens.metrics.desiderata.granger`)."""
    c = prereg["granger"]
    result = granger(
        hm,
        items,
        c["explainers"],
        references=c["references"],
        distance=c["distance"],
        n_resamples=99,  # the per-model intervals are not used: the benchmark's are over models
        progress=False,
    )
    table = result.calibration.set_index(["explainer", "reference", "term"])
    out = {}
    for name in c["explainers"]:
        rows = table.xs((name, "all"), level=("explainer", "term"))
        out[name] = {"rank": float(rows["rank"].mean()), "n_items": int(rows.n_items.sum())}
    return out


def stability_part(hm: mmlens.HookedModel, items: list[dict], prereg: dict) -> dict:
    """Per explainer of the preregistration's stability section, over the first ``inputs_per_model``
    inputs: the median over inputs of the per-input supremum of the relative embedding stability
    (RES, Agarwal et al. 2022) over the epsilon-ball draws (random and adversarial), every perturbed
    and explained modality (:func:`mmlens.metrics.desiderata.stability`); the same of RIS over the
    input-level draws where the adapter has them."""
    c = prereg["stability"]
    result = stability(
        hm,
        items[: c["inputs_per_model"]],
        c["explainers"],
        kinds={m: list(k) for m, k in c["input_kinds"].items()},
        n=c["input_draws"],
        epsilons=c["epsilons"],
        random_draws=c["random_draws"],
        search_steps=c["search_steps"],
        progress=False,
    )
    kept = result.samples[result.samples.kept]
    out = {}
    for name in c["explainers"]:
        own = kept[kept.explainer == name]
        ball = own[own.source != "input"].groupby("input").res.max()
        raw = own[own.source == "input"].groupby("input").ris.max()
        out[name] = {
            "res_sup_median": float(ball.median()) if len(ball) else float("nan"),
            "ris_sup_median": float(raw.median()) if len(raw) else float("nan"),
            "n_inputs": len(ball),
        }
    return out


def evaluate_model(
    hm: mmlens.HookedModel, task: SyntheticTask, rows: Sequence[int], chosen: list[Spec], prereg: dict
) -> dict:
    """Every per-input number of one trained model on the held-out ``rows`` of ``task``: ``inputs``
    (explainer rows), ``unimodal`` (balance per explainer), ``interaction``, ``faithfulness`` (margin
    per explainer), ``granger``, ``stability`` (per explainer) and ``duplicates``."""
    by_name = {s.name: s for s in chosen}
    items = [task.batch([r]) for r in rows]
    inputs, unimodal, explanations = [], [], {s.name: [] for s in chosen}
    for i, (r, x) in enumerate(zip(rows, items)):
        setup = prepare(hm, x, None, "joint")
        truth = truth_mask(task.key_positions(r), {m: setup.spans.masks[m][0] for m in setup.spans.modalities})
        found_rows, found = _explain_input(hm, x, setup, truth, chosen)
        inputs += [{"input": i, **row} for row in found_rows]
        for name, e in found.items():
            explanations[name].append(e)
        for name in prereg["claim_a"]["unimodal_explainers"]:
            spec = by_name[name]
            unimodal.append({"input": i, "explainer": name, "balance": _balance(hm, x, spec.method, spec.options)})
    per_input = interaction(hm, items, emap=False, n_resamples=199, progress=False).per_input
    settings = prereg["claim_c"]
    areas = necessity_areas(
        hm, items, explanations, fractions=settings["fractions"], random_draws=settings["random_draws"]
    )
    mean = areas.groupby("source").auc_necessity_drop.mean()
    scores = {name: [e.scores[0] for e in es] for name, es in explanations.items()}
    return {
        "inputs": inputs,
        "unimodal": unimodal,
        "interaction": per_input.shapley_interaction.tolist(),
        "interaction_logodds": per_input.shapley_interaction_logodds.tolist(),
        "faithfulness": {name: float(mean[name] - mean[RANDOM_TOP_K]) for name in explanations},
        "granger": granger_part(hm, items, prereg),
        "stability": stability_part(hm, items, prereg),
        "duplicates": duplicates(scores),
    }


# --- statistics over the parts -----------------------------------------------------------------------


def _interval(values: Sequence[float], prereg: dict, **kwargs: Any) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size < 2:
        mean = float(v.mean()) if v.size else float("nan")
        return {"estimate": mean, "low": mean, "high": mean, "n": int(v.size), "method": "too few values"}
    ci = bootstrap_ci(v, n_resamples=prereg["n_resamples"], confidence=1 - prereg["alpha"], **kwargs)
    return {**ci.as_dict(), "n": int(v.size)}


def cell_table(inputs: pd.DataFrame, prereg: dict) -> list[dict]:
    """Per (task, explainer), and per explainer over all tasks ("all"): the mean position AUROC
    against the truth with a bootstrap interval over inputs."""
    out = []
    for (task, name), group in inputs.groupby(["task", "explainer"], sort=False):
        out.append({"task": task, "explainer": name, **_interval(group.position_auroc, prereg)})
    for name, group in inputs.groupby("explainer", sort=False):
        out.append({"task": "all", "explainer": name, **_interval(group.position_auroc, prereg)})
    return out


def _combine(verdicts: list[str]) -> str:
    """A conjunction of preregistered comparisons: supported if all are, refuted if any is."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    return "refuted" if "refuted" in verdicts else "inconclusive"


def claim_a(models: pd.DataFrame, prereg: dict) -> dict:
    """(a) per model (task, seed): the interaction separates synergistic models from additive and
    redundant ones (AUROC), unimodal balance does not: AUROC(interaction) - AUROC(balance) > 0."""
    c = prereg["claim_a"]
    pos, neg = models[models.task.isin(c["positive"])], models[models.task.isin(c["negative"])]
    if pos.empty or neg.empty:
        return {"claim": "(a)", "verdict": "inconclusive", "reason": "a positive or negative task was not scored"}
    kw = {"n_resamples": prereg["n_resamples"], "confidence": 1 - prereg["alpha"]}
    result = {
        "interaction": auroc(pos.interaction, neg.interaction, **kw).as_dict(),
        "interaction_logodds (secondary)": auroc(pos.interaction_logodds, neg.interaction_logodds, **kw).as_dict(),
        "comparisons": {},
    }
    for name in c["unimodal_explainers"]:
        col = f"balance_{name}"
        diff = auroc_difference(np.stack([pos.interaction, pos[col]]), np.stack([neg.interaction, neg[col]]), **kw)
        result["comparisons"][name] = {
            "auroc_balance": auroc(pos[col], neg[col], **kw).as_dict(),
            "difference": diff.as_dict(),
            "verdict": verdict(diff, c["null"], claim=c["claim"]),
        }
    verdicts = [v["verdict"] for v in result["comparisons"].values()]
    return {
        "claim": "(a) unimodal explanations miss synergy: the interaction separates synergistic models, "
        "unimodal balance does not",
        "test": "AUROC over models, stratified paired bootstrap of the AUROC difference (scipy.stats.bootstrap)",
        "unit": f"trained models: {len(pos)} positive, {len(neg)} negative",
        "verdict": _combine(verdicts),
        **result,
    }


def _paired(inputs: pd.DataFrame, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Position AUROCs of explainers ``a`` and ``b`` on the inputs where both are defined."""
    wide = inputs.pivot_table(index=["task", "seed", "input"], columns="explainer", values="position_auroc")
    both = wide[[a, b]].dropna()
    return both[a].to_numpy(), both[b].to_numpy()


def claim_b(inputs: pd.DataFrame, prereg: dict) -> dict:
    """(b) attention misattributes: AUROC(reference) - AUROC(attention) > 0 paired over inputs, for
    each reference; secondary: attention's excess image share over uniform on the shortcut task."""
    c = prereg["claim_b"]
    comparisons = {}
    for ref in c["references"]:
        x, y = _paired(inputs, ref, c["attention"])
        ci = bootstrap_ci(x, paired_with=y, n_resamples=prereg["n_resamples"], confidence=1 - prereg["alpha"])
        comparisons[ref] = {
            "difference": ci.as_dict(),
            "n": len(x),
            "verdict": verdict(ci, c["null"], claim=c["claim"]),
        }
    short = inputs[inputs.task == c["excess_task"]]
    first = short.first_modality.iloc[0] if len(short) else "first modality"
    excess = {}
    for name in (c["attention"], *c["references"]):
        rows = short[short.explainer == name]
        excess[name] = _interval((rows.share_first - rows.uniform_share_first).tolist(), prereg)
    return {
        "claim": "(b) attention misattributes: it finds the key positions less well than occlusion and patching",
        "test": "paired bootstrap (BCa) of the mean position-AUROC difference over inputs (scipy.stats.bootstrap)",
        "verdict": _combine([v["verdict"] for v in comparisons.values()]),
        "comparisons": comparisons,
        f"excess_{first}_share_over_uniform_{c['excess_task']}": excess,
    }


def _chance_tests(inputs: pd.DataFrame, prereg: dict) -> dict:
    """Per explainer: sign-flip permutation test of position AUROC - 0.5 > 0, Holm-corrected."""
    names, ps, stats = [], [], []
    for name, group in inputs.groupby("explainer", sort=False):
        v = group.position_auroc.dropna().to_numpy()
        t = permutation_test(
            v, np.full_like(v, 0.5), kind="samples", alternative="greater", n_resamples=prereg["n_permutations"]
        )
        names.append(name)
        ps.append(t.p_value)
        stats.append(t.statistic)
    reject, adjusted = holm(ps, prereg["alpha"])
    return {
        n: {"auroc_minus_half": s, "p_value": p, "p_holm": float(a), "beats_chance": bool(r)}
        for n, s, p, a, r in zip(names, stats, ps, adjusted, reject)
    }


def claim_c(inputs: pd.DataFrame, margins: pd.DataFrame, prereg: dict) -> dict:
    """(c) the faithfulness margin ranks the explainers as the position-level truth does."""
    alpha, n_perm = prereg["alpha"], prereg["n_permutations"]
    wide = inputs.pivot_table(index=["task", "seed", "input"], columns="explainer", values="position_auroc")
    wide = wide.dropna()
    names = list(wide.columns)
    gate = friedmanchisquare(*(wide[n].to_numpy() for n in names))
    truth = wide.mean()
    metric = margins.groupby("explainer").margin.mean().reindex(names)
    greater = permutation_test(metric, truth, spearman, kind="pairings", alternative="greater", n_resamples=n_perm)
    less = permutation_test(metric, truth, spearman, kind="pairings", alternative="less", n_resamples=n_perm)
    passed = bool(gate.pvalue < alpha)
    decided = "supported" if greater.p_value < alpha else "refuted" if less.p_value < alpha else "inconclusive"
    return {
        "claim": "(c) the desiderata (faithfulness margin) rank explainers as the position-level truth does",
        "test": "gate: Friedman test over inputs (scipy.stats.friedmanchisquare); then a permutation test of "
        "Spearman(metric, truth) over explainers (scipy.stats.permutation_test, pairings)",
        "verdict": decided if passed else "inconclusive",
        "gate": {"friedman_statistic": float(gate.statistic), "p_value": float(gate.pvalue), "passed": passed},
        "spearman": greater.statistic,
        "p_value": greater.p_value,
        "p_value_negative": less.p_value,
        "n_explainers": len(names),
        "per_explainer": {n: {"truth_auroc": float(truth[n]), "faithfulness_margin": float(metric[n])} for n in names},
        "chance_tests": _chance_tests(inputs, prereg),
    }


def _model_interval(values: np.ndarray, prereg: dict, paired_with: np.ndarray | None = None) -> Interval:
    """The bootstrap (BCa) interval of the mean over models (of the paired difference, when given)."""
    kw = {"n_resamples": prereg["n_resamples"], "confidence": 1 - prereg["alpha"]}
    if len(values) < 2:
        mean = float(np.mean(values - (0 if paired_with is None else paired_with))) if len(values) else float("nan")
        return Interval(mean, float("nan"), float("nan"), 1 - prereg["alpha"], "too few models")
    return bootstrap_ci(values, paired_with=paired_with, **kw)


def _decided(interval: Interval, c: dict, n: int) -> dict:
    return {**interval.as_dict(), "n_models": n, "verdict": verdict(interval, c["null"], claim=c["claim"])}


def claim_d(models: pd.DataFrame, prereg: dict) -> dict:
    """(d) Granger: the subject's two-sided calibration rank beats the random control's, and is above 0."""
    c = prereg["granger"]
    both = models[[f"granger_{c['subject']}", f"granger_{c['control']}"]].dropna().to_numpy().T
    subject, control = both
    comparisons = {
        f"{c['subject']}_minus_{c['control']}": _decided(_model_interval(subject, prereg, control), c, len(subject)),
        f"{c['subject']}_calibration": _decided(_model_interval(subject, prereg), c, len(subject)),
    }
    per_explainer = {
        name: _model_interval(models[f"granger_{name}"].dropna().to_numpy(), prereg).as_dict()
        for name in c["explainers"]
    }
    return {
        "claim": f"(d) Granger: {c['subject']}'s explanation changes track the output changes (two-sided "
        f"calibration), and better than the {c['control']} control",
        "test": "per model: Spearman(delta, Delta_m) over items (desiderata.granger calibration rank); bootstrap "
        "(BCa) over models of the paired difference and of the subject's rank (scipy.stats.bootstrap)",
        "verdict": _combine([v["verdict"] for v in comparisons.values()]),
        "comparisons": comparisons,
        "per_explainer_rank": per_explainer,
    }


def claim_e(models: pd.DataFrame, prereg: dict) -> dict:
    """(e) stability: the subject's relative embedding stability (sup over the ball) is lower than the control's."""
    c = prereg["stability"]
    both = models[[f"res_{c['control']}", f"res_{c['subject']}"]].dropna().to_numpy().T
    control, subject = both
    comparison = _decided(_model_interval(control, prereg, subject), c, len(subject))
    per_explainer = {
        name: {
            "res_sup_median": _model_interval(models[f"res_{name}"].dropna().to_numpy(), prereg).as_dict(),
            "ris_sup_median (reported)": _model_interval(models[f"ris_{name}"].dropna().to_numpy(), prereg).as_dict(),
        }
        for name in c["explainers"]
    }
    return {
        "claim": f"(e) stability: {c['subject']} is more stable than the {c['control']} control (relative "
        "embedding stability, supremum over an epsilon-ball, scale-invariant)",
        "test": "per model: median over inputs of the per-input sup of RES (desiderata.stability); bootstrap (BCa) "
        "over models of RES(control) - RES(subject) (scipy.stats.bootstrap)",
        "verdict": comparison["verdict"],
        "comparisons": {f"{c['control']}_minus_{c['subject']}": comparison},
        "per_explainer": per_explainer,
    }


def margin_table(margins: pd.DataFrame, prereg: dict) -> list[dict]:
    """Per explainer: the faithfulness margin, mean over models with a bootstrap interval."""
    return [{"explainer": n, **_interval(g.margin, prereg)} for n, g in margins.groupby("explainer", sort=False)]


# --- the run -----------------------------------------------------------------------------------------


TRAINERS: dict[str, Callable[..., TrainedModel]] = {
    **dict.fromkeys(TASKS, train_fusion),
    **dict.fromkeys(GRAPH_TASKS, train_graph_text),
}
"""Task name -> the trainer of its model (image + text: FusionTransformer; graph + text: GraphTextFusion)."""


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/synthetic_benchmark", help="output folder")
    parser.add_argument("--quick", action="store_true", help="the preregistration's quick seeds and inputs")
    parser.add_argument("--tasks", default=None, help=f"comma-separated, of {', '.join(TRAINERS)}")
    parser.add_argument("--prereg", default=str(PREREG), help="the preregistration file")
    parser.add_argument("--substitute-random", action="store_true", help="every explainer replaced by random")
    parser.add_argument("--overwrite", action="store_true", help="recompute parts already saved")
    parser.add_argument("--executor", choices=("serial", "ray"), default="serial", help="where (task, seed) units run")
    parser.add_argument("--workers", type=int, default=1, help="processes (serial: forked) or Ray workers")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (auto, ray://head:10001)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per unit (default 1: small models gain nothing from more, and units side by side "
        "on few cores stall each other's OpenMP threads); results are identical for any executor",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        raise SystemExit(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}")
    if args.ray_address and args.executor != "ray":
        raise SystemExit("--ray-address needs --executor ray")
    if args.tasks is not None:
        args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in args.tasks if t not in TRAINERS]
        if unknown or not args.tasks:
            raise SystemExit(f"--tasks: unknown tasks {unknown}; choose from {', '.join(TRAINERS)}")
    return args


@dataclass(frozen=True)
class Plan:
    """What every (task, seed) unit needs besides its key: picklable, sent once to each Ray worker."""

    n_inputs: int
    chosen: tuple[Spec, ...]
    prereg: dict
    threads: int = 1


def _part(task: str, seed: int, plan: Plan) -> dict:
    """Train or load the model of (task, seed) and evaluate it, or say why it is skipped. Timings in
    wall-clock and CPU seconds (CPU time does not depend on what else runs on the machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    prereg = plan.prereg
    trained = TRAINERS[task](task, seed=seed, threshold=prereg["learned_accuracy"])
    info = {"task": task, "seed": seed, "accuracy": trained.accuracy, "from_cache": trained.from_cache}
    if not trained.learned:
        return {**info, "skipped": f"held-out accuracy {trained.accuracy:.3f} < {prereg['learned_accuracy']}"}
    trained_at, trained_cpu = time.perf_counter(), time.process_time()
    result = evaluate_model(mmlens.wrap(trained.model), trained.task, range(plan.n_inputs), list(plan.chosen), prereg)
    return {
        **info,
        **result,
        "train_seconds": trained_at - start,
        "train_cpu_seconds": trained_cpu - cpu,
        "score_seconds": time.perf_counter() - trained_at,
        "score_cpu_seconds": time.process_time() - trained_cpu,
    }


def compute_unit(plan: Plan, unit: tuple[str, str, int]) -> dict:
    """The record entry of one unit ``(key, task, seed)`` (the executors' ``compute``)."""
    key, task, seed = unit
    before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)  # the same in every executor: kernels sum alike, numbers are identical
    try:
        return {"key": key, **_part(task, seed, plan)}
    finally:
        torch.set_num_threads(before)


def _plan(plan: Plan) -> Plan:
    """The Ray workers' ``rebuild``: the plan itself (models are loaded per unit, from the artefact store)."""
    return plan


def _forked(plan: Plan, todo: list[tuple[str, str, int]], workers: int) -> Iterator[dict]:
    """Units in ``workers`` forked processes of this machine, as they finish."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        for future in as_completed([pool.submit(compute_unit, plan, unit) for unit in todo]):
            yield future.result()


def run_parts(
    units: list[tuple[str, int]],
    plan: Plan,
    record: Record,
    progress: bool,
    executor: Executor | None = None,
    workers: int = 1,
) -> list[dict]:
    """Every (task, seed) part, from ``record`` when finished before, else computed (on ``executor``,
    or in ``workers`` forked processes) and added as it finishes. Raises when two explainers
    duplicate each other."""
    keys = [f"{task}-seed{seed}" for task, seed in units]
    todo = [(key, task, seed) for key, (task, seed) in zip(keys, units) if record.get(key) is None]
    where = executor.describe() if executor else f"{workers} processes" if workers > 1 else "serial"
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=f"benchmark ({where})", disable=not progress)
    if executor is not None:
        entries = executor.map(plan, todo, compute_unit)
    elif workers > 1 and len(todo) > 1:
        entries = _forked(plan, todo, workers)
    else:
        entries = (compute_unit(plan, unit) for unit in todo)
    for entry in entries:
        record.add(entry)
        bar.update()
    bar.close()
    parts = [record.get(key) for key in keys]
    for key, part in zip(keys, parts):
        if part.get("duplicates"):
            raise RuntimeError(f"{key}: explainers with identical scores on every input: {part['duplicates']}")
    return parts


def _frames(parts: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(inputs: one row per input x explainer, models: one row per model, margins: model x explainer).

    Parts are sorted by (task, seed) first: the seeded bootstrap resamples rows by position, so the
    tables must not depend on the order in which parallel workers finished."""
    scored = sorted((p for p in parts if "skipped" not in p), key=lambda p: (p["task"], p["seed"]))
    inputs = pd.DataFrame([{"task": p["task"], "seed": p["seed"], **r} for p in scored for r in p["inputs"]])
    models = []
    for p in scored:
        unimodal = pd.DataFrame(p["unimodal"]).groupby("explainer").balance.mean()
        models.append(
            {
                "task": p["task"],
                "seed": p["seed"],
                "interaction": float(np.mean(p["interaction"])),
                "interaction_logodds": float(np.mean(p["interaction_logodds"])),
                **{f"balance_{k}": float(v) for k, v in unimodal.items()},
                **{f"granger_{k}": v["rank"] for k, v in p["granger"].items()},
                **{f"res_{k}": v["res_sup_median"] for k, v in p["stability"].items()},
                **{f"ris_{k}": v["ris_sup_median"] for k, v in p["stability"].items()},
            }
        )
    margins = pd.DataFrame(
        [
            {"task": p["task"], "seed": p["seed"], "explainer": k, "margin": v}
            for p in scored
            for k, v in p["faithfulness"].items()
        ]
    )
    return inputs, pd.DataFrame(models), margins


def _timing(parts: list[dict], prereg: dict, n_tasks: int) -> dict:
    """CPU seconds per input (scoring) and per model (training), and the full run's estimate on one
    core from them (wall-clock time on a busy machine is longer)."""
    scored = [p for p in parts if "skipped" not in p]
    n_inputs = max(sum(len(p["interaction"]) for p in scored), 1)
    per_input = sum(p["score_cpu_seconds"] for p in scored) / n_inputs
    trained = [p["train_cpu_seconds"] for p in scored if not p["from_cache"]]
    per_model = float(np.mean(trained)) if trained else float("nan")
    design = prereg["design"]
    n_models = n_tasks * len(design["seeds_full"])
    return {
        "score_cpu_seconds_per_input": per_input,
        "train_cpu_seconds_per_model": per_model,
        "wall_seconds_scoring": sum(p["score_seconds"] for p in scored),
        "full_run_estimate_cpu_seconds": {
            "scoring": per_input * n_models * design["inputs_per_seed_full"],
            "training_if_not_cached": per_model * n_models,
        },
    }


def analyse(parts: list[dict], prereg: dict) -> dict:
    """The tables (every cell with an interval) and the three verdicts."""
    inputs, models, margins = _frames(parts)
    return {
        "cells_position_auroc": cell_table(inputs, prereg),
        "cells_faithfulness_margin": margin_table(margins, prereg),
        "models_features": models.to_dict("records"),
        "claims": [
            claim_a(models, prereg),
            claim_b(inputs, prereg),
            claim_c(inputs, margins, prereg),
            claim_d(models, prereg),
            claim_e(models, prereg),
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    prereg, sha = load_prereg(Path(args.prereg))
    design = prereg["design"]
    seeds = design["seeds_quick" if args.quick else "seeds_full"]
    n_inputs = design["inputs_per_seed_quick" if args.quick else "inputs_per_seed_full"]
    tasks = args.tasks or design["tasks"]
    chosen = specs(prereg, args.substitute_random)
    out = Path(args.out)
    start = time.perf_counter()
    head = {"prereg_sha256": sha, "prereg": str(args.prereg), "quick": args.quick, "seeds": seeds}
    head |= {"tasks": tasks, "inputs_per_task": n_inputs * len(seeds), "substitute_random": args.substitute_random}
    head |= {"threads": args.threads}
    atomic_write(out / "benchmark.json", json.dumps({**head, "status": "running"}, indent=1))
    identity = {**head, "explainers": [[s.name, s.method, s.options] for s in chosen]}
    path = out / "parts" / f"{config_hash(identity)}.jsonl"
    record = Record.continuing(path, identity, overwrite=args.overwrite) or Record.create(
        path, "synthetic-benchmark", identity
    )
    units = [(t, s) for t in tasks for s in seeds]
    plan = Plan(n_inputs, tuple(chosen), prereg, args.threads)
    executor = None
    if args.executor == "ray":
        executor = RayExecutor(functools.partial(_plan, plan), address=args.ray_address, workers=args.workers)
    parts = run_parts(units, plan, record, not args.no_progress, executor, args.workers)
    report = {
        **head,
        "status": "done",
        "versions": versions(),
        "explainers": identity["explainers"],
        "controls": [name for name, _, _ in prereg["explainers"]["controls"]],
        "models": [{k: p[k] for k in ("task", "seed", "accuracy", "from_cache", "skipped") if k in p} for p in parts],
        **analyse(parts, prereg),
        "timing": _timing(parts, prereg, len(tasks)),
        "seconds": time.perf_counter() - start,
    }
    atomic_write(out / "benchmark.json", json.dumps(report, indent=1, default=float))
    _print(report, out)
    return report


def _print(report: dict, out: Path) -> None:
    cells = pd.DataFrame(report["cells_position_auroc"])
    table = cells[cells.task == "all"][["explainer", "estimate", "low", "high", "n"]]
    print("\nposition AUROC against the truth, all tasks (95% bootstrap interval):")
    print(table.round(3).to_string(index=False))
    print("\nverdicts:")
    for c in report["claims"]:
        print(f"  {c['verdict'].upper()}: {c['claim']}")
    print(f"\nwrote {out / 'benchmark.json'}")
    print(f"benchmark_seconds={report['seconds']:.1f}")


if __name__ == "__main__":
    main()
