"""Explainers scored against ground truth: synthetic multimodal tasks whose modality dependence is known.

    python -m mmlens.analyses.synthetic_benchmark [--out DIR] [--quick] [--seed 0] [--tasks a,b] [--overwrite]

For every task of :mod:`mmlens.data.tasks` (image only, text only, a text shortcut with a relevant-looking
image, redundant, synergistic XOR) a :class:`mmlens.models.FusionTransformer` is trained in-process
(cached by configuration hash); for the graph + text tasks (the label from a node's neighbourhood;
an XOR of neighbourhood and text) a GNN + text fusion model; and a LLaVA around the real
TinyStories-656K answers colour / shape questions about rendered scenes. A model below its accuracy
threshold is reported and skipped. On
held-out examples, every explainer of :data:`mmlens.methods.explainers.EXPLAINERS`, in joint and unimodal
mode, and the metrics of :mod:`mmlens.metrics.desiderata` are scored against the truth:

- Granger influence: Delta_m (JS divergence, nats, when m takes its neutral reference) must be large
  for the modalities the label depends on and near zero for the others;
- modality-importance ranking: does each explainer put more mass on the modality the label depends
  on (single-modality tasks), or credit both (redundant, synergistic);
- interaction: the Shapley interaction of the two modalities (~0 additive, > 0 synergy, < 0
  redundancy) and the EMAP gap (Hessel & Lee 2020) must separate the XOR task from the additive ones;
- faithfulness (necessity area above random) and stability (Lipschitz ratios), to tell a good
  explainer from a bad one.

Writes ``benchmark.json`` (models with accuracies and seeds, a task x method x mode x score table,
the interaction table, the paper's claims with the numbers behind them, runtime), CSVs, figures,
``table.md`` (the summary as markdown), and prints the table. Each (task, model) part is added as it
finishes to ``parts/<hash>.jsonl``, the :class:`mmlens.runs.record.Record` of these settings and
explainers (hash: :func:`mmlens.store.config_hash`); a rerun with them resumes. The last line is
``benchmark_seconds=<s>``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import mmlens
from mmlens.data.graph_tasks import GRAPH_TASKS
from mmlens.data.tasks import TASK_KINDS
from mmlens.methods.explainers import EXPLAINERS, explain
from mmlens.metrics.desiderata import GrangerResult, examples, faithfulness, granger, interaction, stability
from mmlens.runs.record import Record
from mmlens.store import atomic_path, atomic_write, config_hash, versions
from mmlens.training.classifier import TrainedModel
from mmlens.training.fusion import LEARNED_THRESHOLD, train_fusion

TASK_NAMES = (*TASK_KINDS, *GRAPH_TASKS)

MODALITIES = ("image", "text")
"""The two modalities of the image + text tasks (a case may name others, e.g. graph and text)."""
LARGE = 0.05
"""Delta_m (nats) above which ablating m counts as changing the output."""
SMALL = 0.01
"""Delta_m (nats) below which ablating m counts as leaving the output unchanged."""
RELEVANT = {"image_only": "image", "text_only": "text", "shortcut": "text", "graph_only": "graph"}
"""The single modality each single-modality task's label depends on."""


@dataclass(frozen=True)
class Settings:
    """What one benchmark run computes."""

    n_eval: int = 32
    ig_steps: int = 32
    fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    random_draws: int = 4
    stability_n: int = 2
    n_train: int = 10_000
    seed: int = 0


FULL = Settings()
QUICK = Settings(n_eval=12, ig_steps=16, fractions=(0.0, 0.25, 0.5, 1.0), random_draws=2, stability_n=1, n_train=4000)


@dataclass
class Case:
    """One trained model on one task, with the held-out inputs to explain."""

    task: str
    model_name: str
    kind: str
    depends_on: frozenset[str]
    hooked: mmlens.HookedModel
    inputs: dict
    labels: torch.Tensor
    info: dict
    modalities: tuple[str, str] = MODALITIES


def _model_info(task: str, model: str, trained: TrainedModel, seed: int, **extra: Any) -> dict:
    """The benchmark's record of one trained model (accuracy, cache, truth), in one row."""
    return {
        "task": task,
        "model": model,
        "accuracy": trained.accuracy,
        "learned": trained.learned,
        "threshold": LEARNED_THRESHOLD,
        "neutral_accuracy": trained.neutral_accuracy,
        "train_seconds": trained.train_seconds,
        "from_cache": trained.from_cache,
        "seed": seed,
        **extra,
        "depends_on": sorted(trained.task.depends_on),
        "rule": trained.task.rule,
    }


def fusion_cases(tasks: Sequence[str], settings: Settings) -> list[Case | dict]:
    """Train (or load) a FusionTransformer per task: a :class:`Case`, or a dict saying why it is skipped."""
    out: list[Case | dict] = []
    for task in tasks:
        trained = train_fusion(task, n_train=settings.n_train, seed=settings.seed)
        info = _model_info(task, "fusion-transformer", trained, settings.seed, n_train=settings.n_train)
        if not trained.learned:
            out.append({**info, "skipped": f"test accuracy {trained.accuracy:.3f} < {LEARNED_THRESHOLD}"})
            continue
        rows = range(min(settings.n_eval, len(trained.task)))
        out.append(
            Case(
                task,
                "fusion-transformer",
                trained.task.kind,
                trained.task.depends_on,
                mmlens.wrap(trained.model),
                trained.batch(rows),
                trained.task.labels[list(rows)],
                info,
            )
        )
    return out


def vlm_case(settings: Settings) -> Case | dict:
    """The LLaVA-style VLM over TinyStories-656K (:mod:`mmlens.training.vlm`) on its question answering:
    the answer word depends on the image (the shape's colour or shape) and on the question (which of
    the two), an interaction of both."""
    from mmlens.training.vlm import train_vlm

    vlm = train_vlm(seed=settings.seed)
    info = {
        "task": "vqa",
        "model": "synthetic-vlm (LLaVA + TinyStories-656K)",
        "accuracy": min(vlm.accuracy.values()),
        "accuracy_per_question": vlm.accuracy,
        "learned": vlm.learned,
        "threshold": 0.9,
        "train_seconds": vlm.train_seconds,
        "seed": settings.seed,
        "depends_on": ["image", "text"],
        "rule": "answer = the colour or the shape of the scene's shape, as the question asks",
    }
    if not vlm.learned:
        return {**info, "skipped": f"held-out accuracy {vlm.accuracy} below 0.9"}
    scenes = vlm.test_scenes()[list(range(min(settings.n_eval, len(vlm.test_scenes()))))]
    kinds = ["color", "shape"] * ((len(scenes) + 1) // 2)
    kinds = kinds[: len(scenes)]
    hooked = mmlens.wrap(vlm.model, tokenizer=vlm.tokenizer)
    return Case(
        "vqa",
        "synthetic-vlm",
        "interaction",
        frozenset({"image", "text"}),
        hooked,
        dict(vlm.processor.questions(scenes, kinds)),
        vlm.processor.answer_ids(scenes, kinds),
        info,
    )


def graph_cases(tasks: Sequence[str], settings: Settings) -> list[Case | dict]:
    """Train (or load) a GraphTextFusion per graph + text task (a GNN's target-node embedding as graph
    tokens before the text, :mod:`mmlens.data.graph_tasks`)."""
    from mmlens.training.graph_text import train_graph_text

    out: list[Case | dict] = []
    for task in tasks:
        trained = train_graph_text(task, seed=settings.seed)
        info = _model_info(task, "graph-text-fusion", trained, settings.seed)
        if not trained.learned:
            out.append({**info, "skipped": f"test accuracy {trained.accuracy:.3f} < {LEARNED_THRESHOLD}"})
            continue
        rows = list(range(min(settings.n_eval, len(trained.task))))
        out.append(
            Case(
                task,
                "graph-text-fusion",
                trained.task.kind,
                trained.task.depends_on,
                mmlens.wrap(trained.model),
                trained.batch(rows),
                trained.task.labels[rows],
                info,
                ("graph", "text"),
            )
        )
    return out


def _truth_match(case: Case, shares: dict[str, np.ndarray]) -> float:
    """Fraction of inputs whose explanation ranks the modalities as the truth does: the one the label
    depends on first (single-modality tasks); each with at least a quarter of the mass (both needed)."""
    if len(case.depends_on) == 1:
        (true,) = case.depends_on
        (other,) = set(case.modalities) - {true}
        return float(np.mean(shares[true] > shares[other]))
    return float(np.mean(np.minimum(*(shares[m] for m in case.modalities)) >= 0.25))


class _Rows:
    """The ``scores`` rows of one case: (task, model, method, mode, score, value)."""

    def __init__(self, case: Case):
        self.base = {"task": case.task, "model": case.model_name}
        self.rows: list[dict] = []

    def add(self, method: str, mode: str, score: str, value: float) -> None:
        self.rows.append({**self.base, "method": method, "mode": mode, "score": score, "value": float(value)})


def _add_granger(rows: _Rows, case: Case, g: GrangerResult) -> None:
    """Delta per modality, whether the ablations find the truth, and each explainer's agreement with them."""
    modalities = case.modalities
    delta = g.influence.groupby("modality").delta_js.mean()
    for m in modalities:
        rows.add("granger", "-", f"delta_js_{m}", delta[m])
        rows.add("granger", "-", f"delta_prob_{m}", g.influence[g.influence.modality == m].delta_prob.mean())
    found = {m for m in modalities if delta[m] >= LARGE}
    quiet = {m for m in modalities if delta[m] < SMALL}
    expected_found = set(case.depends_on) if case.kind != "redundant" else set()
    rows.add("granger", "-", "identifies_truth", float(found == expected_found and quiet == set(modalities) - found))
    for r in g.summary.itertuples(index=False):
        rows.add(r.explainer, "joint", f"granger_spearman_{r.ablated}", r.spearman_importance)
        rows.add(r.explainer, "joint", f"granger_kappa_{r.ablated}_to_{r.explained}", r.kappa)


def _add_shares(rows: _Rows, case: Case, method: str, items: list[dict], options: dict) -> None:
    """Per mode (joint, unimodal): each modality's share of the importance mass, the truth match, and
    the unimodal overcount (unimodal minus joint signed score sum, mean over the ``len(items)`` inputs)."""
    hm, modalities = case.hooked, case.modalities
    totals = {}  # mode -> Float[n]: the signed score sum over every explained position
    for mode in ("joint", "unimodal"):
        per_mode = list(modalities) if mode == "unimodal" else ["joint"]
        explained = {m: [explain(hm, one, method, mode=m, **options) for one in items] for m in per_mode}
        masses = {m: np.zeros(len(items)) for m in modalities}
        for m, es in explained.items():
            for i, e in enumerate(es):
                for n in modalities if m == "joint" else [m]:
                    masses[n][i] = float(e.masked(n).abs().sum())
        total = np.maximum(sum(masses.values()), 1e-30)
        shares = {m: v / total for m, v in masses.items()}
        for m in modalities:
            rows.add(method, mode, f"share_{m}", shares[m].mean())
        rows.add(method, mode, "truth_match", _truth_match(case, shares))
        totals[mode] = np.array(
            [sum(float(e.scores[0].nansum()) for e in (es[i] for es in explained.values())) for i in range(len(items))]
        )
    rows.add(method, "unimodal", "overcount", (totals["unimodal"] - totals["joint"]).mean())


def _add_faithfulness_and_stability(
    rows: _Rows, case: Case, method: str, settings: Settings, options: dict | None, progress: bool
) -> None:
    """The faithfulness margin (necessity area, explanation minus random) and the median Lipschitz ratios."""
    hm, x = case.hooked, case.inputs
    f = faithfulness(
        hm,
        x,
        method,
        fractions=settings.fractions,
        random_draws=settings.random_draws,
        seed=settings.seed,
        options=options,
        progress=progress,
    )
    areas = f.areas.set_index(["scope", "source"]).auc_necessity_drop
    rows.add(method, "joint", "faithfulness_margin", areas["joint", "explanation"] - areas["joint", "random"])
    s = stability(
        hm,
        x,
        [method],
        modalities=case.modalities[:1],
        n=settings.stability_n,
        seed=settings.seed,
        options={method: options or {}},
        progress=progress,
    )
    for r in s.summary.itertuples(index=False):
        rows.add(method, "joint", f"stability_median_{'intra' if r.perturbed == r.explained else 'cross'}", r.median)


def evaluate_case(case: Case, settings: Settings, methods: Sequence[str], progress: bool) -> dict:
    """Every score of one case: ``scores`` rows (task, model, method, mode, score, value), ``influence``,
    ``interaction``."""
    hm, x = case.hooked, case.inputs
    options = {"integrated_gradients": {"steps": settings.ig_steps}}
    rows = _Rows(case)
    g = granger(hm, x, list(methods), mode="joint", options=options, progress=progress)
    _add_granger(rows, case, g)
    items = examples(hm, x)
    for method in methods:
        _add_shares(rows, case, method, items, options.get(method, {}))
        _add_faithfulness_and_stability(rows, case, method, settings, options.get(method), progress)
    inter = interaction(hm, x, case.modalities, labels=case.labels, progress=progress)
    rows.add("interaction", "-", "shapley_interaction", inter.mean_interaction)
    rows.add("interaction", "-", "emap_gap", inter.emap["gap"] if inter.emap else float("nan"))
    rows.add("interaction", "-", "emap_accuracy", inter.emap["emap_accuracy"] if inter.emap else float("nan"))
    return {
        "scores": rows.rows,
        "influence": g.influence.assign(**rows.base).to_dict("records"),
        "interaction": inter.per_input.assign(**rows.base).to_dict("records"),
    }


def _value(scores: pd.DataFrame, task: str, method: str, mode: str, score: str) -> float:
    hit = scores[(scores.task == task) & (scores.method == method) & (scores["mode"] == mode) & (scores.score == score)]
    return float(hit.value.mean()) if len(hit) else float("nan")


def _interaction_claim(scores: pd.DataFrame, tasks: Sequence[str], have: set[str]) -> dict | None:
    """Claim (a), when the synergistic task and an additive one were scored."""
    additive = [t for t in ("image_only", "text_only", "shortcut") if t in have]
    if "synergistic" not in have or not additive:
        return None
    inter = {t: _value(scores, t, "interaction", "-", "shapley_interaction") for t in tasks if t in have}
    overcount = {t: _value(scores, t, "integrated_gradients", "unimodal", "overcount") for t in tasks if t in have}
    separates = inter["synergistic"] > 0.1 and all(inter["synergistic"] > 4 * abs(inter[t]) for t in additive)
    misses = abs(overcount["synergistic"]) > 0.1 and all(
        abs(overcount["synergistic"]) > 4 * abs(overcount[t]) for t in additive
    )
    return {
        "claim": "(a) unimodal explanations miss the cross-modal interaction (synergistic task)",
        "supported": bool(separates and misses),
        "evidence": {"shapley_interaction": inter, "unimodal_ig_overcount": overcount},
        "reading": "integrated gradients in unimodal mode (each modality explained with the other held "
        "at its input) sum to f(x) - f(x without m) per modality; joint mode sums to f(x) - "
        "f(nothing). Their difference is the interaction, counted twice for synergy and not at "
        "all for redundancy. It is ~0 on additive tasks and large on XOR, so per-modality "
        "scores absorb the interaction into both modalities and cannot show it.",
    }


def _attention_claim(scores: pd.DataFrame, have: set[str]) -> dict | None:
    """Claim (b), when the shortcut task was scored."""
    if "shortcut" not in have:
        return None
    attention = _value(scores, "shortcut", "attention", "joint", "share_image")
    occlusion = _value(scores, "shortcut", "occlusion", "joint", "share_image")
    delta = _value(scores, "shortcut", "granger", "-", "delta_js_image")
    return {
        "claim": "(b) attention weights misattribute influence (shortcut task)",
        "supported": bool(attention >= 0.2 and delta < SMALL and attention > 3 * max(occlusion, 1e-6)),
        "evidence": {"attention_share_image": attention, "occlusion_share_image": occlusion, "delta_js_image": delta},
        "reading": "attention's share of mass on the image tokens vs the image's causal effect "
        "(Delta_image) and occlusion's share",
    }


def _per_explainer(scores: pd.DataFrame, methods: list[str], single: list[str], have: set[str]) -> pd.DataFrame:
    """Explainer x (truth, granger_alignment, faithfulness_margin, stability_median), each a mean over tasks."""
    delta = scores[scores.score.str.startswith("delta_js_")]
    quiet = [(r.task, r.score[len("delta_js_") :]) for r in delta.itertuples() if r.value < SMALL]
    return pd.DataFrame(
        {
            m: {
                "truth": np.nanmean([_value(scores, t, m, "joint", f"share_{RELEVANT[t]}") for t in single]),
                "granger_alignment": np.nanmean([1 - _value(scores, t, m, "joint", f"share_{n}") for t, n in quiet]),
                "faithfulness_margin": np.nanmean([_value(scores, t, m, "joint", "faithfulness_margin") for t in have]),
                "stability_median": np.nanmean([_value(scores, t, m, "joint", "stability_median_intra") for t in have]),
            }
            for m in methods
        }
    ).T


def _metrics_claim(scores: pd.DataFrame, have: set[str]) -> dict | None:
    """Claim (c), when a single-modality task and at least 3 explainers were scored."""
    single = [t for t in RELEVANT if t in have]
    methods = [m for m in dict.fromkeys(scores.method) if m not in ("granger", "interaction")]
    if not single or len(methods) < 3:
        return None
    per = _per_explainer(scores, methods, single, have)
    agree = {
        metric: float(per.truth.rank().corr(sign * per[metric].rank()))
        for metric, sign in (("granger_alignment", 1), ("faithfulness_margin", 1), ("stability_median", -1))
    }
    return {
        "claim": "(c) the Granger, faithfulness and stability metrics tell a good explainer from a bad one",
        "supported": bool(agree["granger_alignment"] >= 0.5 and agree["faithfulness_margin"] >= 0.5),
        "evidence": {"per_explainer": per.round(4).to_dict("index"), "spearman_with_truth": agree},
        "reading": "explainers ranked by the ground truth (mean importance share on the modality the "
        "label depends on, single-modality tasks) "
        "and by each metric computed without it: Granger alignment (1 - the importance share "
        "on modalities whose ablation leaves the output unchanged), the faithfulness margin, "
        "and stability (lower median Lipschitz ratio = better); supported when the Granger "
        "and faithfulness rankings agree with the truth (Spearman >= 0.5). Stability is "
        "reported, not required: a constant explainer is perfectly stable",
    }


def claims(scores: pd.DataFrame, tasks: Sequence[str]) -> list[dict]:
    """The paper's claims (a)-(c), each with the numbers behind it and whether they support it."""
    have = set(scores.task)
    found = (_interaction_claim(scores, tasks, have), _attention_claim(scores, have), _metrics_claim(scores, have))
    return [c for c in found if c is not None]


def _figures(scores: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = list(dict.fromkeys(scores.task))
    match = scores[(scores.score == "truth_match")]
    table = match.pivot_table(index="task", columns=["method", "mode"], values="value").reindex(tasks)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * table.shape[1], 0.6 + 0.5 * len(tasks)))
    im = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(
        range(table.shape[1]), [f"{m}\n{mode}" for m, mode in table.columns], rotation=60, ha="right", fontsize=7
    )
    ax.set_yticks(range(len(tasks)), tasks)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="truth match (fraction of inputs)")
    ax.set_title("Does the explanation rank the modalities as the ground truth does?")
    fig.tight_layout()
    with atomic_path(out / "truth_match.png") as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
    written.append("truth_match.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    delta = scores[scores.score.str.startswith("delta_js_")].assign(modality=lambda d: d.score.str[9:])
    pivot = delta.pivot_table(index="task", columns="modality", values="value").reindex(tasks)
    pivot.plot.bar(ax=axes[0], rot=20)
    axes[0].axhline(LARGE, ls="--", c="k", lw=0.8)
    axes[0].set_ylabel("Delta_m: JS divergence (nats)")
    axes[0].set_title("Granger influence: ablate one modality")
    inter = scores[scores.score.isin(["shapley_interaction", "emap_gap"])]
    inter.pivot_table(index="task", columns="score", values="value").reindex(tasks).plot.bar(ax=axes[1], rot=20)
    axes[1].axhline(0, c="k", lw=0.8)
    axes[1].set_title("Modality interaction (> 0 synergy, < 0 redundancy)")
    fig.tight_layout()
    with atomic_path(out / "influence_and_interaction.png") as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
    written.append("influence_and_interaction.png")
    return written


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Task x (method, mode) truth match, plus Delta per modality and the interaction per task."""
    match = scores[scores.score == "truth_match"].pivot_table(index="task", columns=["method", "mode"], values="value")
    match.columns = [f"{m} ({mode[0]})" for m, mode in match.columns]
    extra = scores[
        scores.method.isin(["granger", "interaction"])
        & (
            scores.score.str.startswith("delta_js_")
            | scores.score.isin(["identifies_truth", "shapley_interaction", "emap_gap"])
        )
    ]
    extra = extra.pivot_table(index="task", columns="score", values="value")
    order = list(dict.fromkeys(scores.task))
    return extra.join(match).reindex(order)


def markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """``table`` (index = first column) as a GitHub markdown table."""
    head = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for index, row in table.iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join([str(index)] + cells) + " |")
    return "\n".join(lines) + "\n"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/synthetic_benchmark", help="output folder")
    parser.add_argument("--quick", action="store_true", help="CI size: 12 held-out inputs, fewer steps and draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, of {', '.join(TASK_NAMES)}")
    parser.add_argument("--methods", default=",".join(EXPLAINERS), help="comma-separated explainers")
    parser.add_argument("--no-vlm", action="store_true", help="skip the LLaVA-style VLM (vqa) case")
    parser.add_argument("--overwrite", action="store_true", help="recompute parts already saved")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, given, valid in (("task", args.tasks, TASK_NAMES), ("explainer", args.methods, tuple(EXPLAINERS))):
        unknown = [t for t in given if t not in valid]
        if unknown or not given:
            raise SystemExit(f"unknown {name}s {unknown}; choose from {', '.join(valid)}")
    return args


def score_cases(
    cases: Sequence[Case | dict], settings: Settings, methods: Sequence[str], record: Record, progress: bool
) -> tuple[list[dict], list[dict]]:
    """Every case's model info and scores (:func:`evaluate_case`), each added to ``record`` as it
    finishes and reused from it when finished before."""
    models, parts = [], []
    for case in cases:
        if isinstance(case, dict):
            print(f"{case['task']}: model not used ({case['skipped']})")
            models.append(case)
            continue
        models.append(case.info)
        key = f"{case.task}-{case.model_name}"
        if record.get(key) is not None:
            parts.append(record.get(key))
            print(f"{case.task}: resumed from {record.path}")
            continue
        start = time.perf_counter()
        result = evaluate_case(case, settings, methods, progress=progress)
        parts.append(record.add({"key": key, **result, "seconds": time.perf_counter() - start}))
        print(f"{case.task}: accuracy {case.info['accuracy']:.3f}, scored in {parts[-1]['seconds']:.1f} s")
    return models, parts


DEFINITIONS = {
    "delta_js_m": "mean JS divergence (nats) of the final distribution when m takes its neutral reference",
    "identifies_truth": "1 if exactly the modalities the label depends on have Delta >= large and the others Delta < "
    "small (redundant task: the truth for single ablations is none)",
    "truth_match": "fraction of inputs whose explanation ranks the modalities as the truth does",
    "shapley_interaction": "mean v(ab) - v(a) - v(b) + v(none), v = prob of the prediction",
    "emap_gap": "accuracy - accuracy of the additive projection (EMAP)",
    "faithfulness_margin": "necessity-drop area of the explanation minus that of random top-k (joint)",
}
"""What the scores in ``benchmark.json`` mean."""


def _write(out: Path, report: dict, parts: list[dict], table: pd.DataFrame) -> None:
    """benchmark.json, the CSVs and table.md."""
    atomic_write(out / "benchmark.json", json.dumps(report, indent=1, default=float))
    for name, rows in (
        ("scores", report["scores"]),
        ("influence", [r for p in parts for r in p["influence"]]),
        ("interaction", [r for p in parts for r in p["interaction"]]),
        ("models", report["models"]),
    ):
        atomic_write(out / f"{name}.csv", pd.DataFrame(rows).to_csv(index=False))
    if not table.empty:
        atomic_write(out / "table.md", markdown(table))


def _print(report: dict, table: pd.DataFrame, out: Path) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("\nmodels:")
        print(
            pd.DataFrame(report["models"])[["task", "model", "accuracy", "learned", "train_seconds"]].to_string(
                index=False
            )
        )
        print("\nscores (truth match per explainer: j = joint, u = unimodal):")
        print(table.round(3).to_string())
    print("\nclaims:")
    for c in report["claims"]:
        print(f"  {'SUPPORTED' if c['supported'] else 'NOT SUPPORTED'}: {c['claim']}")
        print(f"    {json.dumps(c['evidence'], default=lambda v: round(float(v), 4))}")
    print(f"\nwrote {out / 'benchmark.json'}")
    print(f"benchmark_seconds={report['seconds']:.1f}")


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    settings = Settings(**{**asdict(QUICK if args.quick else FULL), "seed": args.seed})
    out = Path(args.out)
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    identity = {"settings": asdict(settings), "methods": args.methods}
    path = out / "parts" / f"{config_hash(identity)}.jsonl"
    record = Record.continuing(path, identity, overwrite=args.overwrite) or Record.create(
        path, "synthetic-benchmark", identity
    )
    cases = (
        fusion_cases([t for t in args.tasks if t in TASK_KINDS], settings)
        + graph_cases([t for t in args.tasks if t in GRAPH_TASKS], settings)
        + ([] if args.no_vlm else [vlm_case(settings)])
    )
    models, parts = score_cases(cases, settings, args.methods, record, progress=not args.no_progress)
    scores = pd.DataFrame([row for p in parts for row in p["scores"]])
    table = summary_table(scores) if not scores.empty else pd.DataFrame()
    report = {
        "settings": asdict(settings),
        "quick": args.quick,
        "versions": versions(),
        "models": models,
        "thresholds": {"large_delta_js": LARGE, "small_delta_js": SMALL, "learned_accuracy": LEARNED_THRESHOLD},
        "scores": scores.to_dict("records"),
        "claims": claims(scores, args.tasks) if not scores.empty else [],
        "figures": _figures(scores, out) if not scores.empty else [],
        "seconds": time.perf_counter() - start,
        "definitions": DEFINITIONS,
    }
    _write(out, report, parts, table)
    _print(report, table, out)
    return report


if __name__ == "__main__":
    main()
