"""Soft tokens across modalities: the TEA-GLM lens metrics and slot controls on the synthetic VLM.

Issue 15, item 5: is "soft tokens barely evolve" a property of graph tokens, or of projected soft
tokens in general? :func:`vlm_comparison` runs, on held-out scenes of ``synthetic-vlm`` (LLaVA
around the real TinyStories-656K with a trained projector), exactly what the TEA-GLM job runs on
its graph tokens: the logit lens under each variant (:data:`LENS_VARIANTS`), the evolution metrics
with and without the embedding row, slot controls in the image positions, and the verdicts of
:mod:`mmlens.metrics.lens_verdicts` (paired bootstrap + TOST, Holm-corrected per-layer tests).

Conditions, all through one pipeline, only the soft span's input embeddings differ:

- the soft span itself (its adapter name, e.g. ``image``) and the ``text`` tokens of the same prompts;
- ``text_caption``: the embeddings of a caption of that scene ("a red circle on a dark background"),
  cycled to fill the slots; ``text_neutral``: a fixed neutral phrase;
- ``random_norm``: random directions scaled to each soft token's norm;
- ``mean_embedding``: the mean token embedding in every slot.

:func:`soft_token_comparison` is the model-agnostic core (any wrapped model whose spans are
``text`` and one soft span); :func:`plot_soft_token_comparison` draws graph and image tokens'
differences against their controls side by side.

    python -m mmlens.analyses.soft_token_lens [--quick] [--n-inputs N] [--out DIR]
        [--graph-json results/tea_glm_logit_lens/logit_lens.json]

Shapes: ``b`` inputs, ``K`` soft slots per input, ``d`` the LM's width.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from mmlens.analyses.tea_glm_controls import LENS_VARIANTS
from mmlens.core.adapter import get_module
from mmlens.core.wrapper import HookedModel
from mmlens.data.paths import cache_dir
from mmlens.methods.evolution import METRICS, ROWS, condition_tables, layer_curves
from mmlens.methods.lens import layer_labels
from mmlens.metrics.lens_verdicts import MARGINS, span_verdict
from mmlens.plots import save_figure
from mmlens.store import atomic_write, config_hash

SLOT_CONTROLS = ("text_caption", "text_neutral", "random_norm", "mean_embedding")
"""The VLM's slot controls, in the order :func:`against_controls` checks them (after ``text``)."""
NEUTRAL_PHRASE = " once upon a time there was a little dog who liked to play in the park with his friend"
CAPTION = " a {color} {shape} on a dark background"
N_INPUTS = 128
TINY_VLM = {"n_train": 64, "n_test": 16, "vision_steps": 3, "steps": 2, "batch_size": 4, "vision_batch_size": 4}
"""``vlm_options`` of a barely trained VLM (a few steps): the code path for tests, numbers mean nothing."""
QUICK = {"n_inputs": 8, "lens_variants": ("normed",), "n_resamples": 199}
"""What ``quick=True`` overrides: a few inputs, one lens variant, fewer permutations in the per-layer
tests (tests; numbers mean nothing)."""
N_RESAMPLES = 999
"""Permutations of each per-layer test (as in the TEA-GLM job)."""
ROLES = {
    "text": "text tokens (other positions)",
    "text_title": "own words in the slots",
    "text_caption": "own words in the slots",
    "text_neutral": "neutral phrase in the slots",
    "mean_embedding": "mean embedding in the slots",
    "random_norm": "norm-matched random in the slots",
    "constant_input": "node-agnostic projector",
    "no_neighbours": "own-features encoder",
}
"""Comparison name -> what it controls for; graph and image comparisons of one role share a row
of :func:`plot_soft_token_comparison` (``text_title`` for graphs is ``text_caption`` for images)."""
_VERSION = 1  # bump when the computation changes what a configuration produces


def soft_span(hooked: HookedModel, inputs: Mapping[str, Any]) -> str:
    """The one non-``text`` span of ``inputs`` as the adapter names it (``"image"``, ``"graph"``, ...)."""
    names = [m for m in hooked.spans(inputs).modalities if m != "text"]
    if len(names) != 1:
        raise ValueError(
            f"the soft-token comparison needs inputs with 'text' and exactly one soft span; the adapter "
            f"{hooked.adapter.name!r} finds {hooked.spans(inputs).modalities}"
        )
    return names[0]


def input_embeddings(hooked: HookedModel) -> Tensor:
    """The LM's input embedding matrix Float[vocab, d] (the adapter's ``lm.embed`` point)."""
    if "lm.embed" not in hooked.hook_points:
        raise KeyError(f"adapter {hooked.adapter.name!r} has no 'lm.embed' point; text-in-slot controls need it")
    return get_module(hooked.model, hooked.hook_points["lm.embed"].site.module).weight.detach()


def soft_tokens(hooked: HookedModel, inputs: Mapping[str, Any], span: str) -> Tensor:
    """The soft tokens as the LM receives them (``fusion.embeds`` at ``span``): Float[b, K, d]."""
    run = hooked.run(inputs, cache="fusion.embeds")
    mask = run.spans.masks[span]
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"span {span!r} has {counts.tolist()} positions per row; the controls need equal counts")
    return run.cache["fusion.embeds"][mask].reshape(mask.shape[0], int(counts[0]), -1)


def slot_controls(
    hooked: HookedModel, tokens: Tensor, own_texts: Sequence[str], neutral: str, seed: int
) -> dict[str, Tensor]:
    """The slot controls' contents, name -> Float[b, K, d], for soft ``tokens`` Float[b, K, d]:
    own words (``own_texts``, one per input, token embeddings cycled to K), a ``neutral`` phrase,
    norm-matched random directions (seeded) and the mean token embedding."""
    weight = input_embeddings(hooked).to(tokens.dtype)
    tokenizer = hooked.require_tokenizer("text-in-slot controls")
    b, k, _ = tokens.shape

    def cycled(text: str) -> Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"text-in-slot control: {text!r} has no tokens; give a non-empty text")
        return weight[torch.tensor((ids * k)[:k])]

    if len(own_texts) != b:
        raise ValueError(f"own_texts has {len(own_texts)} texts for {b} inputs; give one per input")
    g = torch.Generator().manual_seed(seed + 17)
    directions = torch.randn(tokens.shape, generator=g, dtype=tokens.dtype)
    return {
        "text_caption": torch.stack([cycled(t) for t in own_texts]),
        "text_neutral": cycled(neutral)[None].expand(b, -1, -1),
        "random_norm": directions / directions.norm(dim=-1, keepdim=True) * tokens.norm(dim=-1, keepdim=True),
        "mean_embedding": weight.mean(0).expand(b, k, -1),
    }


def variant_tables(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    span: str,
    slots: Mapping[str, Tensor],
    variants: Sequence[str],
    seed: int,
) -> dict[str, dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    """Per lens variant (names of :data:`LENS_VARIANTS`) and each of :data:`ROWS`, the per-input and
    per-layer evolution tables of every condition (``modality``: ``span``, ``text`` and each slot
    control), one recorded forward per condition (:func:`condition_tables`)."""
    finals = [LENS_VARIANTS[v] for v in variants]
    runs = [condition_tables(hooked, inputs, span, span, variants=finals, seed=seed)]
    runs += [
        condition_tables(hooked, inputs, span, name, slots=value, variants=finals, with_text=False, seed=seed)
        for name, value in slots.items()
    ]
    return {
        v: {
            rows: tuple(pd.concat([r[LENS_VARIANTS[v]][rows][i] for r in runs], ignore_index=True) for i in (0, 1))
            for rows in ROWS
        }
        for v in variants
    }


def soft_token_comparison(
    hooked: HookedModel,
    inputs: Mapping[str, Any],
    slots: Mapping[str, Tensor],
    lens_variants: Sequence[str] = ("normed", "raw", "naive"),
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> dict:
    """Every lens variant x layer rows: metric means per condition, the verdict table, the deciding
    comparison, per-layer tests and pooled curves, for the soft span of ``inputs`` against ``text``
    and each slot control (``slots``: name -> Float[b, K, d]). Keys ``"<variant>/<rows>"``."""
    unknown = [v for v in lens_variants if v not in LENS_VARIANTS]
    if unknown:
        raise ValueError(f"lens_variants: {unknown} unknown; use any of {list(LENS_VARIANTS)}")
    span = soft_span(hooked, inputs)
    out = {}
    labels = layer_labels(hooked)
    for variant, tables in variant_tables(hooked, inputs, span, slots, lens_variants, seed).items():
        for rows, (per_input, per_layer) in tables.items():
            means = per_input.groupby(["modality", "metric"], sort=False)["value"].mean()
            out[f"{variant}/{rows}"] = {
                "final_norm": LENS_VARIANTS[variant],
                "span": span,
                "metrics": {m: {k: float(v) for k, v in means[m].items()} for m in dict.fromkeys(per_input.modality)},
                **span_verdict(per_input, per_layer, span, list(slots), seed=seed, n_resamples=n_resamples),
                "curves": layer_curves(per_layer, labels, seed=seed).to_dict(orient="records"),
                "layers": labels,
            }
    return out


def vlm_comparison(
    lens_variants: Sequence[str] = ("normed", "raw", "naive"),
    n_inputs: int = N_INPUTS,
    seed: int = 0,
    progress: bool = True,
    *,
    quick: bool = False,
    vlm_options: Mapping[str, Any] | None = None,
) -> dict:
    """The soft-token comparison on ``synthetic-vlm``'s image tokens (module docstring), as a
    JSON-ready dict, cached under ``cache_dir()/tea_glm/vlm-<hash>.json`` by the settings' hash.

    Args:
        lens_variants: keys of :data:`LENS_VARIANTS`.
        n_inputs: held-out scenes, asked the colour and the shape question in turn.
        seed: seeds the random control and the bootstraps.
        quick: override with :data:`QUICK` (tests).
        progress: print each variant's verdicts when computed.
        vlm_options: :func:`mmlens.training.vlm.train_vlm` arguments (default: those of
            ``load_model("synthetic-vlm")``, the cached default model). The model is the one
            ``load_model("synthetic-vlm")`` builds, taken from ``train_vlm`` itself because that
            also gives its held-out scenes and accuracy.

    Returns ``{"lens_variants": {"<variant>/<rows>": {...}}, "accuracy", "n_inputs", "settings",
    "span", "controls", "seconds"}``.
    """
    from mmlens.training.vlm import VLMConfig

    options = dict(vlm_options or {})
    settings = {
        "lens_variants": list(lens_variants),
        "n_inputs": n_inputs,
        "seed": seed,
        "n_resamples": N_RESAMPLES,
        **(QUICK if quick else {}),
        "vlm": VLMConfig(**options).identity(),
        "margins": MARGINS,
        "controls": list(SLOT_CONTROLS),
        "neutral_phrase": NEUTRAL_PHRASE,
        "caption": CAPTION,
        "version": _VERSION,
    }
    path = cache_dir() / "tea_glm" / f"vlm-{config_hash(settings)}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    record = _run_vlm(settings, options, progress)
    record.update(n_inputs=settings["n_inputs"], settings=settings, seconds=time.perf_counter() - start)
    text = json.dumps(record, allow_nan=False)
    atomic_write(path, text)
    return json.loads(text)  # what a cache hit returns (tuples as lists)


def _run_vlm(settings: dict, options: dict, progress: bool) -> dict:
    """Train or load the VLM (``options``), build the held-out batch, and compare (:func:`_compare_vlm`)."""
    from mmlens.training.vlm import train_vlm

    trained = train_vlm(**options)
    scenes = trained.test_scenes()
    n_inputs = settings["n_inputs"]
    if not 2 <= n_inputs <= len(scenes):
        raise ValueError(f"n_inputs={n_inputs}: choose 2..{len(scenes)} (the held-out scenes of this VLM)")
    scenes = scenes[:n_inputs]
    kinds = [trained.config.kinds[i % len(trained.config.kinds)] for i in range(n_inputs)]
    inputs = trained.processor.questions(scenes, kinds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: 1 thread is ~6x faster than 2 on busy cores; one float order anywhere
    try:
        return _compare_vlm(trained, inputs, scenes, kinds, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _compare_vlm(trained: Any, inputs: dict, scenes: Any, kinds: list[str], settings: dict, progress: bool) -> dict:
    """The record of :func:`vlm_comparison` (without its settings) for the held-out batch ``inputs``."""
    from mmlens.training.vlm import COLORS, SHAPES, answer_accuracy

    hooked = HookedModel(trained.model, tokenizer=trained.tokenizer, processor=trained.processor, name="synthetic-vlm")
    span, seed = soft_span(hooked, inputs), settings["seed"]
    with torch.no_grad():
        tokens = soft_tokens(hooked, inputs, span)
        captions = [CAPTION.format(color=c, shape=s) for c, s in zip(scenes.colors, scenes.shapes)]
        slots = slot_controls(hooked, tokens, captions, NEUTRAL_PHRASE, seed)
        variants = soft_token_comparison(
            hooked, inputs, slots, settings["lens_variants"], seed, settings["n_resamples"]
        )
        on_inputs = {
            k: answer_accuracy(
                trained.model, trained.processor, scenes[[i for i, q in enumerate(kinds) if q == k]], [k]
            )[k]
            for k in dict.fromkeys(kinds)
        }
    if progress:
        for name, v in variants.items():
            print(
                f"[soft_token_lens] {name}: "
                + ", ".join(f"{r['metric']} {r['verdict']} ({r['deciding']})" for r in v["verdict"])
            )
    return {
        "model": "synthetic-vlm",
        "span": span,
        "n_slots": int(tokens.shape[1]),
        "lens_variants": variants,
        "controls": {name: {"kind": "slot"} for name in slots},
        "accuracy": {
            "held_out": trained.accuracy,
            "lens_inputs": on_inputs,
            "chance": {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES)},
        },
    }


def _difference_rows(variants: Mapping[str, Any], variant: str, source: str) -> pd.DataFrame:
    """The ``comparisons`` records of one lens-variant entry as rows ``source, role, metric, diff, low, high``."""
    if variant not in variants:
        raise KeyError(f"{source}: no lens variant {variant!r}; have {sorted(variants)}")
    rows = [
        {
            "source": source,
            "role": ROLES.get(name, name),
            **{k: r[k] for k in ("metric", "diff", "low", "high", "verdict")},
        }
        for name, records in variants[variant]["comparisons"].items()
        for r in records
    ]
    return pd.DataFrame(rows)


def plot_soft_token_comparison(
    graph_variants: Mapping[str, Any], vlm_record: Mapping[str, Any], variant: str = "normed/no_embedding_row"
) -> Figure:
    """Per metric, the paired mean difference (soft tokens minus each comparison) with its 95%
    interval, graph tokens (the TEA-GLM job's ``lens_variants``) next to image tokens
    (:func:`vlm_comparison`'s record), and the equivalence margin shaded around zero."""
    import matplotlib.pyplot as plt

    table = pd.concat(
        [
            _difference_rows(graph_variants, variant, "graph tokens"),
            _difference_rows(vlm_record["lens_variants"], variant, "image tokens"),
        ],
        ignore_index=True,
    )
    roles = list(dict.fromkeys(table.role))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 0.45 * len(roles) + 1.6), sharey=True)
    offsets = {"graph tokens": -0.15, "image tokens": 0.15}
    colors = {"graph tokens": "tab:orange", "image tokens": "tab:green"}
    for ax, (metric, direction) in zip(np.atleast_1d(axes), METRICS.items()):
        margin = MARGINS[metric]
        ax.axvspan(-margin, margin, color="0.9", zorder=0)
        ax.axvline(0, color="0.4", lw=0.8)
        for source, group in table[table.metric == metric].groupby("source"):
            y = np.array([roles.index(r) for r in group.role]) + offsets[source]
            err = np.stack([group["diff"] - group.low, group.high - group["diff"]])
            ax.errorbar(group["diff"], y, xerr=err, fmt="o", ms=4, capsize=2, color=colors[source], label=source)
        side = "lower" if direction == "lower" else "higher"
        ax.set_title(f"{metric}\n(soft {side} = evolves less)", fontsize=9)
        ax.set_yticks(range(len(roles)), roles, fontsize=8)
    first = np.atleast_1d(axes)[0]
    first.invert_yaxis()  # the y axis is shared: invert it once
    first.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.12), ncol=2, frameon=False)
    fig.suptitle(f"Soft tokens minus comparison ({variant}); grey: equivalence margin", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """Run :func:`vlm_comparison`, print its verdicts without the embedding row, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-inputs", type=int, default=N_INPUTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/soft_token_lens")
    parser.add_argument("--graph-json", help="the TEA-GLM job's logit_lens.json: also draw soft_tokens.png/.svg")
    args = parser.parse_args(argv)
    record = vlm_comparison(n_inputs=args.n_inputs, seed=args.seed, quick=args.quick)
    out = Path(args.out)
    atomic_write(out / "vlm_comparison.json", json.dumps(record, indent=1))
    print(f"wrote {out / 'vlm_comparison.json'} ({record['seconds']:.1f} s when computed)")
    if args.graph_json:
        graph = json.loads(Path(args.graph_json).read_text())["lens_variants"]
        primary = "normed/no_embedding_row"
        fig = plot_soft_token_comparison(graph, record, primary if primary in graph else next(iter(graph)))
        print("wrote", *save_figure(fig, out / "soft_tokens"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
