"""Desiderata speed: mmlens's batched faithfulness, stability and Granger vs the same numbers one sample at a time.

    python -m mmlens.analyses.bench_metrics [--quick] [--repeats 3] [--sections llava,smollm2] [--threads N]

Quantus-style libraries loop: every perturbed sample is one model call. The reference here is
written that way, independently of :mod:`mmlens.metrics.desiderata`, and computes the same numbers:

- faithfulness (occlusion explanations): for every input, scope (each modality, and ``joint`` and
  ``global`` (top-k across modalities) when there are several), fraction k and keep/remove variant of the explanation's top-k and of the
  random masks (drawn from ``torch.Generator().manual_seed(seed)`` in the order
  :func:`mmlens.metrics.desiderata.faithfulness` draws them), one batch-1 forward with the LM-input
  embeddings replaced (``hooked.run(x, edits=[mmlens.replace(point, variant)])``);
- stability (occlusion explainer): the perturbations of :func:`mmlens.metrics.perturb.perturb`, and for the
  input and each perturbed input an occlusion explanation computed one occluded position per
  forward, then the Lipschitz ratios and the relative stability (explanation change over the
  relative raw-input and LM-input-embedding changes);
- Granger (occlusion explainer, neutral reference): for every input and modality m, occlusion of x and
  of x with m neutral, one forward per position, then Delta_m (JS divergence, probability drop) and the
  self and cross explanation changes (mass distance). The mmlens side also computes the calibration
  table (cluster bootstrap, 199 resamples), which the reference does not.

Both sides explain with occlusion (window 1) and share only the model, the perturbations and
``hooked.readout_logits``; the reference builds its own embeddings, neutral baseline, explanations and masks.
Timing is end to end per implementation and metric (explaining included), repeats interleaved
round by round (the order rotates), median reported, after one small untimed warm-up run of each.
Each row also shows the positions x rows its last run sent through the first LM block (token-rows)
and the time per token-row: batching pays off per forward call, not per position computed.
Agreement compares every number of ``faithfulness(...).curves``,
``stability(...).samples`` (the ``kept`` flags must be equal) and ``granger(...).explanations``.

Sections: the tiny random LLaVA on its two example rows (text + image; image perturbations, as it
has no tokenizer) and SmolLM2-135M-Instruct on short sentences with words of the shipped synonym
list (text perturbations). The output ends with per-section ratio lines and, as the last line,
``speedup=<total reference time / total mmlens time> max_abs_diff=<largest difference>``; every number
must agree within ``TOLERANCE + RELATIVE_TOLERANCE * |reference|`` (see :data:`RELATIVE_TOLERANCE`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

import mmlens
from mmlens.analyses.bench_patching import offline_if_cached
from mmlens.core.wrapper import HookedModel
from mmlens.data.loading import load_model
from mmlens.methods import variants
from mmlens.methods.setups import embedding_point
from mmlens.metrics.desiderata import examples, faithfulness, granger, stability
from mmlens.metrics.perturb import perturb

TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-3
"""Agreement: |mmlens - reference| <= TOLERANCE + RELATIVE_TOLERANCE * |reference| for every number.
The relative part is for ratios of float32 differences of nearly equal probabilities (stability's
``ris``: an explanation change over a 0.05 input change): variants packed as a prefix tree round
differently from batch-1 forwards (up to ~1e-6 in a probability), and such ratios carry it at ~1e-4
relative."""
SENTENCES = (
    "The little dog was happy and ran quickly to the big house.",
    "She smiled at the tiny cat, then walked to the door.",
    "He was angry, so he shouted at the slow bus.",
)


@dataclass(frozen=True)
class Settings:
    """The estimates' settings, the same for both implementations."""

    fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    random_draws: int = 5
    n: int = 4  # perturbation draws per kind
    seed: int = 0


FULL = Settings()
QUICK = Settings(fractions=(0.0, 0.5, 1.0), random_draws=2, n=2)
WARM = Settings(fractions=(0.0, 1.0), random_draws=1, n=1)


# -- the reference: one batch-1 forward per sample ---------------------------------------------------


@dataclass
class _Base:
    """One input's forward: LM-input embeddings Float[1, seq, d], the neutral baseline at every
    modality's positions, the modality positions, the explained (valid) positions, the final logits."""

    embeds: Tensor
    baseline: Tensor
    positions: dict[str, list[int]]
    explained: list[int]
    logits: Tensor


def _base(hooked: HookedModel, x: dict, point: str) -> _Base:
    """One forward of ``x`` caching the embeddings, and one per modality's neutral reference."""
    run = hooked.run(x, cache=point)
    embeds = run.cache[point]
    spans = hooked.spans(x)
    baseline = embeds.clone()
    positions = {}
    for m in spans.modalities:
        mask = spans.masks[m][0].to(embeds.device)
        baseline[0, mask] = hooked.run(hooked.neutral(x, m), cache=point).cache[point][0, mask]
        positions[m] = mask.nonzero()[:, 0].tolist()
    valid = set(spans.valid[0].nonzero()[:, 0].tolist())
    explained = sorted(p for ps in positions.values() for p in ps if p in valid)
    return _Base(embeds, baseline, positions, explained, hooked.readout_logits(run.logits, x)[0])


def _prob(hooked: HookedModel, x: dict, point: str, base: _Base, to_baseline: Sequence[int], target: int) -> Tensor:
    """One batch-1 forward with ``to_baseline`` positions at the baseline: p(target), Float[]."""
    variant = base.embeds.clone()
    variant[0, list(to_baseline)] = base.baseline[0, list(to_baseline)]
    run = hooked.run(x, edits=[mmlens.replace(point, variant)])
    return hooked.readout_logits(run.logits, x)[0].float().softmax(-1)[target]


def reference_occlusion(hooked: HookedModel, x: dict, point: str, base: _Base, target: int) -> dict[int, float]:
    """Occlusion (window 1), one forward per explained position: position -> f(x) - f(x, position at baseline)."""
    value = base.logits.float().softmax(-1)[target]
    return {p: float(value - _prob(hooked, x, point, base, [p], target)) for p in base.explained}


def _top(scores: dict[int, float], positions: list[int], k: float) -> list[int]:
    """The ceil(k * n) highest-scoring ``positions`` (ties by position; unscored last)."""
    order = sorted(positions, key=lambda p: -scores.get(p, float("-inf")))
    return order[: math.ceil(k * len(positions) - 1e-9)]


def reference_faithfulness(hooked: HookedModel, items: list[dict], settings: Settings) -> pd.DataFrame:
    """:func:`mmlens.metrics.desiderata.faithfulness` curves (occlusion explanations), one forward per variant."""
    point = embedding_point(hooked)
    generator = torch.Generator().manual_seed(settings.seed)
    fractions = sorted(set(settings.fractions))
    rows = []
    for i, x in enumerate(items):
        base = _base(hooked, x, point)
        target = int(base.logits.argmax())
        f = float(base.logits.float().softmax(-1)[target])
        scores = reference_occlusion(hooked, x, point, base, target)
        modalities = list(base.positions)
        for scope in modalities + (["joint", "global"] if len(modalities) > 1 else []):
            members = modalities if scope in ("joint", "global") else [scope]
            in_scope = [p for m in members for p in base.positions[m]]
            for k in fractions:
                groups = [base.explained] if scope == "global" else [base.positions[m] for m in members]
                top = [p for ps in groups for p in _top(scores, ps, k)]
                draws = []
                for _ in range(settings.random_draws):
                    draw = []
                    for ps in groups:
                        order = torch.randperm(len(ps), generator=generator)[: math.ceil(k * len(ps) - 1e-9)]
                        draw += [ps[j] for j in order.tolist()]
                    draws.append(draw)
                for source, masks in (("explanation", [top]), ("random", draws)):
                    keep = [
                        float(_prob(hooked, x, point, base, sorted(set(in_scope) - set(mask)), target))
                        for mask in masks
                    ]
                    remove = [float(_prob(hooked, x, point, base, mask, target)) for mask in masks]
                    f_keep, f_remove = sum(keep) / len(keep), sum(remove) / len(remove)
                    rows.append(
                        {
                            "input": i,
                            "scope": scope,
                            "k": k,
                            "source": source,
                            "f": f,
                            "f_keep": f_keep,
                            "f_remove": f_remove,
                            "sufficiency_gap": abs(f_keep - f),
                            "necessity_drop": f - f_remove,
                        }
                    )
    return pd.DataFrame(rows)


def reference_stability(
    hooked: HookedModel, items: list[dict], modalities: Sequence[str], settings: Settings
) -> pd.DataFrame:
    """:func:`mmlens.metrics.desiderata.stability` samples (occlusion explainer), one forward per occluded position."""
    point = embedding_point(hooked)
    rows = []
    for i, x in enumerate(items):
        base = _base(hooked, x, point)
        target = int(base.logits.argmax())
        scores = reference_occlusion(hooked, x, point, base, target)
        for m in modalities:
            for draw, p in enumerate(perturb(hooked, x, m, n=settings.n, seed=settings.seed + i)):
                moved = _base(hooked, p.inputs, point)
                at = base.positions[m]
                distance = float((base.embeds[0, at].float() - moved.embeds[0, at].float()).norm())
                if distance == 0:
                    continue
                kept = int(moved.logits.argmax()) == target
                moved_scores = reference_occlusion(hooked, p.inputs, point, moved, target)
                embedding_change = distance / float(base.embeds[0, at].float().norm())
                input_change = _raw_change(hooked, x, p.inputs, m)
                for n, ps in base.positions.items():
                    ps = [q for q in ps if q in scores]
                    before = torch.tensor([scores[q] for q in ps])
                    change = float((before - torch.tensor([moved_scores[q] for q in ps])).norm())
                    relative = change / max(float(before.norm()), 1e-30)
                    rows.append(
                        {
                            "input": i,
                            "explainer": "occlusion",
                            "perturbed": m,
                            "kind": p.kind,
                            "draw": draw,
                            "explained": n,
                            "input_distance": distance,
                            "explanation_distance": change,
                            "ratio": change / distance,
                            "explanation_change": relative,
                            "embedding_change": embedding_change,
                            "ris": relative / max(input_change, 1e-6),
                            "res": relative / max(embedding_change, 1e-6),
                            "kept": kept,
                        }
                    )
    return pd.DataFrame(rows)


def _raw_change(hooked: HookedModel, a: dict, b: dict, modality: str) -> float:
    """The relative change of ``modality``'s raw inputs (the adapter's ``modality_inputs``): root sum of
    squares of ||a - b|| / ||a|| (float inputs) and the fraction of changed entries (integer inputs)."""
    total = 0.0
    for key in hooked.adapter.modality_inputs[modality]:
        x, y = a[key], b[key]
        if x.shape != y.shape:
            part = abs(x.numel() - y.numel()) / x.numel()
        elif x.is_floating_point():
            part = float((x - y).float().norm() / x.float().norm())
        else:
            part = float((x != y).float().mean())
        total += part * part
    return math.sqrt(total)


def _js(p_logits: Tensor, q_logits: Tensor) -> float:
    """Jensen-Shannon divergence (nats) of two logit vectors' softmaxes."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    m = (p + q) / 2
    kl = [float((a[a > 0] * (a[a > 0].log() - m[a > 0].log())).sum()) for a in (p, q)]
    return (kl[0] + kl[1]) / 2


def reference_granger(hooked: HookedModel, items: list[dict]) -> pd.DataFrame:
    """:func:`mmlens.metrics.desiderata.granger` explanation rows (occlusion, neutral reference, mass
    distance): per input and modality m, occlusion of x and of x with m neutral, one forward per position."""
    point = embedding_point(hooked)
    rows = []
    for i, x in enumerate(items):
        base = _base(hooked, x, point)
        target = int(base.logits.argmax())
        scores = reference_occlusion(hooked, x, point, base, target)
        for m in base.positions:
            x_m = hooked.neutral(x, m)
            moved = _base(hooked, x_m, point)
            moved_scores = reference_occlusion(hooked, x_m, point, moved, target)
            scale = sum(abs(v) for v in scores.values()) / len(scores)
            scale += sum(abs(v) for v in moved_scores.values()) / len(moved_scores)
            p, q = base.logits.float().softmax(-1)[target], moved.logits.float().softmax(-1)[target]
            for n, ps in base.positions.items():
                change = sum(abs(scores.get(r, 0.0) - moved_scores.get(r, 0.0)) for r in ps) / len(ps)
                rows.append(
                    {
                        "input": i,
                        "ablated": m,
                        "explained": n,
                        "delta": change / max(scale, 1e-30),
                        "delta_js": _js(base.logits, moved.logits),
                        "delta_prob": float(p - q),
                    }
                )
    return pd.DataFrame(rows)


# -- timing and agreement ---------------------------------------------------------------------------


@dataclass
class Timed:
    """One implementation of one metric: its runs' wall times, the load after each, its last result."""

    metric: str
    name: str
    run: Callable[[], pd.DataFrame]
    times: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    result: pd.DataFrame | None = None
    token_rows: int = 0  # positions x rows through the first LM block in the last run

    @property
    def time(self) -> float:
        return statistics.median(self.times)


def measure(impls: list[Timed], repeats: int, hooked: HookedModel) -> None:
    """Run every implementation ``repeats`` times, interleaved round by round (the order rotates),
    counting the positions x rows each run sends through the first LM block (``token_rows``)."""
    rows = [0]
    first = hooked.model.get_submodule(hooked.hook_points["lm.blocks.0.resid_pre"].site.module)

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        rows[0] += hidden.shape[0] * hidden.shape[1]

    handle = first.register_forward_pre_hook(count, with_kwargs=True)
    try:
        for round_ in range(repeats):
            for impl in impls[round_ % len(impls) :] + impls[: round_ % len(impls)]:
                rows[0] = 0
                start = time.perf_counter()
                with torch.no_grad():
                    impl.result = impl.run()
                impl.times.append(time.perf_counter() - start)
                impl.load.append(os.getloadavg()[0])
                impl.token_rows = rows[0]
    finally:
        handle.remove()


def difference(
    mine: pd.DataFrame, reference: pd.DataFrame, keys: list[str], values: list[str], flags: Sequence[str] = ()
) -> tuple[float, float]:
    """Largest |difference| of ``values`` over rows matched on ``keys``, and the largest in units of
    the tolerance (|difference| / (TOLERANCE + RELATIVE_TOLERANCE * |reference|); <= 1 agrees); both
    inf if the rows or ``flags`` differ or a difference is NaN."""
    if mine.empty or len(mine) != len(reference):
        return float("inf"), float("inf")
    merged = mine.merge(reference, on=keys, suffixes=("", "_ref"))
    if len(merged) != len(mine) or any((merged[c] != merged[f"{c}_ref"]).any() for c in flags):
        return float("inf"), float("inf")
    diffs = pd.concat([(merged[c] - merged[f"{c}_ref"]).abs() for c in values])
    allowed = pd.concat([TOLERANCE + RELATIVE_TOLERANCE * merged[f"{c}_ref"].abs() for c in values])
    if diffs.isna().any():
        return float("inf"), float("inf")
    return float(diffs.max()), float((diffs / allowed).max())


def _mmlens_faithfulness(hooked: HookedModel, items: list[dict], settings: Settings) -> pd.DataFrame:
    """``faithfulness(...).curves`` of occlusion explanations, as the benchmark calls it."""
    return faithfulness(
        hooked,
        items,
        "occlusion",
        fractions=settings.fractions,
        random_draws=settings.random_draws,
        seed=settings.seed,
        progress=False,
    ).curves


def _mmlens_stability(
    hooked: HookedModel, items: list[dict], modalities: list[str], settings: Settings
) -> pd.DataFrame:
    """``stability(...).samples`` with the occlusion explainer, as the benchmark calls it."""
    return stability(
        hooked, items, ["occlusion"], modalities=modalities, n=settings.n, seed=settings.seed, progress=False
    ).samples


def _mmlens_granger(hooked: HookedModel, items: list[dict]) -> pd.DataFrame:
    """``granger(...).explanations`` with the occlusion explainer (calibration with 199 resamples included)."""
    return granger(hooked, items, ["occlusion"], n_resamples=199, progress=False).explanations


METRICS = ("faithfulness", "stability", "granger")


def _implementations(hooked: HookedModel, items: list[dict], modalities: list[str], settings: Settings) -> list[Timed]:
    """The timed runs, mmlens then reference for each of :data:`METRICS`."""
    return [
        Timed("faithfulness", "mmlens faithfulness (batched)", lambda: _mmlens_faithfulness(hooked, items, settings)),
        Timed(
            "faithfulness",
            "reference (one forward per variant)",
            lambda: reference_faithfulness(hooked, items, settings),
        ),
        Timed(
            "stability",
            "mmlens stability (batched occlusion)",
            lambda: _mmlens_stability(hooked, items, modalities, settings),
        ),
        Timed(
            "stability",
            "reference (one forward per position)",
            lambda: reference_stability(hooked, items, modalities, settings),
        ),
        Timed("granger", "mmlens granger (batched occlusion)", lambda: _mmlens_granger(hooked, items)),
        Timed("granger", "reference (one forward per position)", lambda: reference_granger(hooked, items)),
    ]


def _warm_up(hooked: HookedModel, items: list[dict], modalities: list[str]) -> None:
    """One small untimed run of each implementation on the first input."""
    with torch.no_grad():
        _mmlens_faithfulness(hooked, items[:1], WARM)
        reference_faithfulness(hooked, items[:1], WARM)
        _mmlens_stability(hooked, items[:1], modalities, WARM)
        reference_stability(hooked, items[:1], modalities, WARM)
        _mmlens_granger(hooked, items[:1])
        reference_granger(hooked, items[:1])


def _differences(impls: list[Timed]) -> dict[str, tuple[float, float]]:
    """Largest |difference| mmlens vs reference of each metric, absolute and in tolerance units (see
    :func:`difference`)."""
    faith_mine, faith_ref, stab_mine, stab_ref, granger_mine, granger_ref = (impl.result for impl in impls)
    return {
        "faithfulness": difference(
            faith_mine,
            faith_ref,
            ["input", "scope", "k", "source"],
            ["f", "f_keep", "f_remove", "sufficiency_gap", "necessity_drop"],
        ),
        "stability": difference(
            stab_mine[stab_ref.columns],
            stab_ref,
            ["input", "perturbed", "kind", "draw", "explained"],
            ["input_distance", "explanation_distance", "ratio", "explanation_change", "embedding_change", "ris", "res"],
            flags=["kept"],
        ),
        "granger": difference(
            granger_mine[granger_ref.columns],
            granger_ref,
            ["input", "ablated", "explained"],
            ["delta", "delta_js", "delta_prob"],
        ),
    }


def _summary(impls: list[Timed], diffs: dict[str, tuple[float, float]]) -> dict:
    """Speedups (reference time / mmlens time) per metric and all together, differences, agreement and times."""
    pairs = {metric: (impls[2 * j], impls[2 * j + 1]) for j, metric in enumerate(METRICS)}
    mine_total = sum(mine.time for mine, _ in pairs.values())
    ref_total = sum(ref.time for _, ref in pairs.values())
    out = {f"{metric}_speedup": ref.time / mine.time for metric, (mine, ref) in pairs.items()}
    out.update(
        {f"{metric}_max_abs_diff": diff for metric, (diff, _) in diffs.items()},
        speedup=ref_total / mine_total,
        max_abs_diff=max(diff for diff, _ in diffs.values()),
        agree=all(units <= 1 for _, units in diffs.values()),
        times={f"{impl.metric}_{side}": impl.time for impl, side in zip(impls, ("mmlens", "reference") * len(METRICS))},
        mmlens_s=mine_total,
        reference_s=ref_total,
    )
    return out


def _print_workload(
    hooked: HookedModel, items: list[dict], modalities: list[str], settings: Settings, impls: list[Timed]
) -> None:
    """The inputs and what each metric computed on them (from the mmlens results)."""
    faith_mine, stab_mine, granger_mine = impls[0].result, impls[2].result, impls[4].result
    spans = hooked.spans(items[0])
    layout = ", ".join(f"{len(spans.masks[m][0].nonzero())} {m}" for m in spans.modalities)
    print(f"  {len(items)} inputs (first: {spans.seq_len} positions: {layout}); occlusion explainer (window 1)")
    print(
        f"  faithfulness: fractions {list(settings.fractions)}, {settings.random_draws} random draws, scopes "
        f"{sorted(set(faith_mine.scope))} -> {len(faith_mine)} curve rows"
    )
    print(
        f"  stability: {', '.join(modalities)} perturbations, n={settings.n} per kind -> {len(stab_mine)} samples "
        f"({int(stab_mine.kept.sum())} kept)"
    )
    print(f"  granger: every modality neutral in turn, self and cross terms -> {len(granger_mine)} explanation rows")


def _print_times(impls: list[Timed], repeats: int, summary: dict) -> None:
    """The timing table: each implementation, then both metrics together per side."""
    mine_total, ref_total = summary["mmlens_s"], summary["reference_s"]
    width = max(len(impl.name) for impl in impls)
    print(
        f"  {'metric':<13} {'implementation':<{width}} {'time (s)':>9} {'x mmlens':>9} {'load 1m':>8} "
        f"{'token-rows':>10} {'ms/row':>7}"
    )
    for mine, ref in zip(impls[::2], impls[1::2]):
        for impl in (mine, ref):
            spread = f"  [{min(impl.times):.3f}-{max(impl.times):.3f}]" if len(impl.times) > 1 else ""
            per_row = 1000 * impl.time / max(impl.token_rows, 1)
            print(
                f"  {impl.metric:<13} {impl.name:<{width}} {impl.time:9.3f} {impl.time / mine.time:9.2f} "
                f"{max(impl.load):8.2f} {impl.token_rows:10d} {per_row:7.2f}{spread}"
            )
    print(f"  {'all':<13} {'mmlens':<{width}} {mine_total:9.3f} {1:9.2f}")
    print(f"  {'all':<13} {'reference':<{width}} {ref_total:9.3f} {ref_total / mine_total:9.2f}")
    print(
        f"  (median of {repeats} interleaved run(s), end to end, explaining included; load 1m = the largest "
        f"1-minute load average after a run, above ~{torch.get_num_threads()} means another process competed; "
        "token-rows = positions x rows through the first LM block in the last run, ms/row = time per token-row)"
    )


def run_section(
    title: str,
    hooked: HookedModel,
    items: list[dict],
    modalities: list[str],
    settings: Settings,
    repeats: int,
    notes: Sequence[str] = (),
) -> dict:
    """Time and compare both metrics on ``items``; print ``title``, ``notes`` and the table; returns ratios,
    times and differences."""
    print(f"\n{title}")
    for note in notes:
        print(f"  {note}")
    impls = _implementations(hooked, items, modalities, settings)
    _warm_up(hooked, items, modalities)
    measure(impls, repeats, hooked)
    diffs = _differences(impls)
    out = _summary(impls, diffs)
    _print_workload(hooked, items, modalities, settings, impls)
    _print_times(impls, repeats, out)
    for metric, (diff, units) in diffs.items():
        status = "OK" if units <= 1 else "MISMATCH"
        print(
            f"  agreement {metric}: max |difference| {diff:.2e}, {units:.2f} of the tolerance "
            f"({TOLERANCE:.0e} + {RELATIVE_TOLERANCE:.0e} x |reference|): {status}"
        )
    print(
        f"  speedup: faithfulness {out['faithfulness_speedup']:.2f}x, stability {out['stability_speedup']:.2f}x, "
        f"granger {out['granger_speedup']:.2f}x, all {out['speedup']:.2f}x"
    )
    return out


# -- sections ---------------------------------------------------------------------------------------


def run_llava(settings: Settings, repeats: int) -> dict:
    loaded = load_model("tiny-random-llava")
    hooked = mmlens.wrap(loaded.model)
    items = examples(hooked, loaded.example_inputs())
    return run_section(
        "== tiny random LLaVA (2 example rows, text + image) ==", hooked, items, ["image"], settings, repeats
    )


def run_smollm2(settings: Settings, repeats: int) -> dict:
    name = "smollm2-135m-instruct"
    with offline_if_cached(name):
        loaded = load_model(name)
    hooked = mmlens.HookedModel(loaded.model, tokenizer=loaded.tokenizer)
    items = [hooked.to_inputs(s) for s in SENTENCES]
    notes = [
        f"sentence {s!r}: {x['input_ids'].shape[1]} tokens, {len(perturb(hooked, x, 'text', n=settings.n))} "
        "text perturbations"
        for s, x in zip(SENTENCES, items)
    ]
    return run_section("== SmolLM2-135M-Instruct (text) ==", hooked, items, ["text"], settings, repeats, notes)


def _environment(settings: Settings, repeats: int) -> None:
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pandas": pd.__version__,
        "mmlens": mmlens.__version__,
    }
    print("environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"  torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), CPU cores "
        f"{os.cpu_count()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; float32 on CPU; "
        f"mmlens batch_size 32, PACK_TOKENS {variants.PACK_TOKENS} (0: no prefix trees); {repeats} repeat(s); "
        f"seed {settings.seed}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seconds, for tests: tiny LLaVA only, fractions 0/0.5/1, 2 random draws, n=2, 1 repeat",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 3; quick 1)")
    parser.add_argument("--sections", default=None, help="comma-separated: llava, smollm2 (default both; quick: llava)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--pack-tokens",
        type=int,
        default=variants.PACK_TOKENS,
        help=f"mmlens.methods.variants.PACK_TOKENS for the run (default {variants.PACK_TOKENS}; 0: masked "
        "variants in sorted batches only, no prefix trees)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    spec = args.sections or ("llava" if args.quick else "llava,smollm2")
    sections = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = set(sections) - {"llava", "smollm2"}
    if unknown or not sections:
        raise SystemExit(f"--sections takes llava and/or smollm2, got {args.sections!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    default_pack, variants.PACK_TOKENS = variants.PACK_TOKENS, args.pack_tokens
    try:
        _environment(settings, repeats)
        runners = {"llava": run_llava, "smollm2": run_smollm2}
        results: dict = {s: runners[s](settings, repeats) for s in sections}
    finally:
        variants.PACK_TOKENS = default_pack
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    for s in sections:
        r = results[s]
        print(
            f"{s}_faithfulness_speedup={r['faithfulness_speedup']:.2f} {s}_stability_speedup="
            f"{r['stability_speedup']:.2f} {s}_granger_speedup={r['granger_speedup']:.2f} "
            f"{s}_speedup={r['speedup']:.2f} {s}_max_abs_diff={r['max_abs_diff']:.2e}"
        )
    speedup = sum(results[s]["reference_s"] for s in sections) / sum(results[s]["mmlens_s"] for s in sections)
    diff = max(results[s]["max_abs_diff"] for s in sections)
    results.update(speedup=speedup, max_abs_diff=diff, agree=all(results[s]["agree"] for s in sections))
    print(f"speedup={speedup:.2f} max_abs_diff={diff:.2e}")
    return results


if __name__ == "__main__":
    raise SystemExit(0 if main()["agree"] else 1)
