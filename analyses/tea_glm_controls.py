"""Matched controls, lens variants, verdicts and the patching check of the TEA-GLM reproduction.

Every condition runs through the same pipeline (one recorded forward, :func:`logit_lens`, then
:func:`evolution`) on the same test-node prompts; only the five graph slots' input embeddings differ:

- ``graph``: the trained projector's graph tokens (one per model seed);
- slot controls (``fusion.embeds`` replaced at the graph slots): ``text_title`` (the embeddings of
  the node's first title tokens), ``text_neutral`` (a fixed neutral phrase), ``random_norm``
  (random directions scaled to each graph token's norm), ``mean_embedding`` (the mean token
  embedding in every slot);
- projector controls: graph tokens of a projector trained on a constant input (a node-agnostic soft
  prompt, ``constant_input``) and on a GNN run without edges (own features only, ``no_neighbours``),
  with their test accuracies.

Shapes: ``b`` lens nodes, ``K`` graph slots, ``d`` the LM's width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.data.paths import cache_dir
from mmlens.methods.evolution import condition_tables
from mmlens.methods.patching import logprob, sweep
from mmlens.metrics.lens_verdicts import span_verdict
from mmlens.models import TeaGLM
from mmlens.store import atomic_write, config_hash
from mmlens.training.loop import train_or_load
from mmlens.training.tea_glm import classify_nodes, train_projector

Reproduction = Any
"""A :class:`mmlens.analyses.tea_glm_logit_lens.Reproduction` (not imported: that module imports this one)."""

LENS_VARIANTS: dict[str, Any] = {"normed": True, "raw": False, "naive": "naive"}
"""``final_norm`` of each lens variant: nostalgebraist's (final norm at every layer), the paper's
literal softmax(lm_head . h), and a naive Hugging Face reading (raw intermediate, normed last)."""

SLOT_CONTROLS = ("text_title", "text_neutral", "random_norm", "mean_embedding")
PROJECTOR_CONTROLS = ("constant_input", "no_neighbours")
NEUTRAL_PHRASE = " this is a short note about the work"
DECIDING_ORDER = ("text_title", "text_neutral", "mean_embedding", "random_norm", "constant_input", "no_neighbours")
"""Matched comparisons in the order :func:`against_controls` checks them (after graph vs text)."""


def slot_controls(rep: Reproduction, nodes: list[int], graph_tokens: Tensor, seed: int) -> dict[str, Tensor]:
    """The slot controls' K embeddings per lens node: name -> Float[b, K, d]."""
    embed = rep.model.lm.get_input_embeddings()
    weight = embed.weight.detach()
    k = rep.config.num_graph_tokens
    tokenizer = rep.prompts.tokenizer

    def first_k(text: str) -> Tensor:
        ids = tokenizer.encode(text, add_special_tokens=False) or [rep.prompts.pad_id]
        ids = (ids * k)[:k]
        return weight[torch.tensor(ids)]

    titles = torch.stack([first_k(" " + rep.graph.titles[n]) for n in nodes])
    neutral = first_k(NEUTRAL_PHRASE)[None].expand(len(nodes), -1, -1)
    g = torch.Generator().manual_seed(seed + 17)
    directions = torch.randn(graph_tokens.shape, generator=g, dtype=graph_tokens.dtype)
    random_norm = directions / directions.norm(dim=-1, keepdim=True) * graph_tokens.norm(dim=-1, keepdim=True)
    mean = weight.mean(0).expand(len(nodes), k, -1)
    return {"text_title": titles, "text_neutral": neutral, "random_norm": random_norm, "mean_embedding": mean}


def projector_control(rep: Reproduction, kind: str, steps: int, progress: bool) -> tuple[Tensor, dict]:
    """Train (or load) a projector on node-agnostic (``constant_input``) or edge-free
    (``no_neighbours``) node representations; returns (its node representations Float[n_nodes, d_gnn],
    its accuracy record on the evaluated test nodes)."""
    if kind == "constant_input":
        node_repr = rep.node_repr.mean(0, keepdim=True).expand_as(rep.node_repr).contiguous()
    elif kind == "no_neighbours":
        with torch.no_grad():
            node_repr = rep.model.gnn(rep.features, torch.zeros(2, 0, dtype=torch.long))
    else:
        raise ValueError(f"unknown projector control {kind!r}; use one of {PROJECTOR_CONTROLS}")
    model = control_model(rep)
    key = config_hash((rep.keys["projector"], kind, steps), digits=12)
    config = replace(rep.config.projector, steps=steps, seed=rep.model_seed)
    train = rep.split["train"]
    train_or_load(
        "tea_glm_projector",
        key,
        model.projector,
        lambda: {
            "loss": train_projector(
                model, rep.prompts, node_repr, rep.graph.titles, rep.graph.labels, train, config, progress=progress
            )
        },
    )
    model.eval()
    rep.control_models[kind] = model
    test = torch.tensor(rep.evaluation["test_nodes"])
    path = cache_dir() / "tea_glm" / f"evaluation-{kind}-{config_hash((key, rep.keys['evaluation']), digits=12)}.json"
    if path.exists():
        return node_repr, json.loads(path.read_text())
    scores = classify_nodes(model, rep.prompts, node_repr, rep.graph.titles, test, progress=progress, desc=kind)
    accuracy = float((scores.argmax(1) == rep.graph.labels[test]).float().mean())
    record = {"accuracy": accuracy, "steps": steps, "cache_key": key, "n_test_nodes": len(test)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record))
    return node_repr, record


def control_model(rep: Reproduction) -> TeaGLM:
    """A TEA-GLM sharing ``rep``'s frozen LM and GNN with a fresh projector (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rep.model_seed)
        return TeaGLM(rep.model.lm, rep.model.gnn, rep.model.graph_token_id, rep.config.num_graph_tokens)


def lens_tables(
    rep: Reproduction,
    inputs: dict,
    positions: Tensor,
    slots: Tensor | None,
    name: str,
    variants: Sequence[str],
    with_text: bool,
    progress: bool = False,
) -> dict[str, dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    """One recorded forward of a condition (``slots`` Float[b, K, d] in the graph slots, or the
    model's own graph tokens when None), decoded under every lens variant (names of
    :data:`LENS_VARIANTS`; :func:`~mmlens.methods.evolution.condition_tables`):
    ``{variant: {rows: (per_input, per_layer)}}``; the graph span is renamed ``name``."""
    tables = condition_tables(
        rep.hooked,
        inputs,
        "graph",
        name,
        slots=slots,
        variants=[LENS_VARIANTS[v] for v in variants],
        positions=positions,
        with_text=with_text,
        seed=rep.config.seed,
        progress=progress,
    )
    return {v: tables[LENS_VARIANTS[v]] for v in variants}


def pool_seeds(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Average per-input (and per-layer) values over model seeds: the node stays the unit."""
    frame = pd.concat(tables, ignore_index=True)
    keys = [c for c in ("input", "modality", "metric", "layer") if c in frame.columns]
    return frame.groupby(keys, as_index=False, sort=False)["value"].mean()


def variant_verdict(per_input: pd.DataFrame, per_layer: pd.DataFrame, controls: list[str], seed: int) -> dict:
    """Verdicts of graph vs text and vs each matched control in :data:`DECIDING_ORDER`
    (:func:`span_verdict`)."""
    return span_verdict(per_input, per_layer, "graph", [c for c in DECIDING_ORDER if c in controls], seed=seed)


def patching_check(rep: Reproduction, nodes: list[int], progress: bool) -> pd.DataFrame:
    """Layer x span activation patching: for each lens node, the prompt with graph tokens of a node
    of another class is the corrupted run; clean residuals (``resid_pre``) of one span at one layer
    are patched in and the log-prob of the clean node's answer is read. Returns the mean over nodes
    per ``layer, span`` of ``value`` and ``normalized`` (fraction of the clean-corrupted gap restored)."""
    labels = rep.graph.labels
    pool = torch.tensor(rep.evaluation["test_nodes"])
    g = torch.Generator().manual_seed(rep.config.seed + 3)
    rows = []
    for pair, node in enumerate(nodes):
        others = pool[labels[pool] != labels[node]]
        other = int(others[torch.randint(len(others), (1,), generator=g)])
        clean = rep.inputs([node])
        corrupted = {**clean, "node_ids": torch.tensor([other])}
        answer = int(rep.prompts.answer_ids[labels[node]])
        result = sweep(
            rep.hooked, clean, corrupted, logprob(answer), hook="resid_pre", axes=("layer", "span"), progress=False
        )
        table = result.table.assign(pair=pair, node=node, other=other)
        rows.append(table)
    table = pd.concat(rows, ignore_index=True)
    return table.groupby(["layer", "span"], as_index=False)[["value", "normalized"]].mean()


def _conditions(rep: Reproduction, nodes: list[int], progress: bool) -> tuple[dict[str, Tensor], dict]:
    """Slot contents of every control (name -> Float[b, K, d]) and the projector controls' accuracies."""
    with torch.no_grad():
        graph_tokens = rep.model.graph_tokens(rep.node_repr[nodes])
        slots = slot_controls(rep, nodes, graph_tokens, rep.config.seed)
        accuracy = {}
        for kind in PROJECTOR_CONTROLS:
            node_repr, accuracy[kind] = projector_control(rep, kind, rep.config.control_projector_steps, progress)
            slots[kind] = rep.control_models[kind].graph_tokens(node_repr[nodes])
    return slots, accuracy


def _variant_tables(
    reps: list[Reproduction], slots: dict[str, Tensor], inputs: dict, positions: Tensor, progress: bool
) -> dict[str, dict[str, tuple[pd.DataFrame, pd.DataFrame]]]:
    """Per lens variant and layer rows (``all_layers``, ``no_embedding_row``): the per-input and
    per-layer tables of every condition, the graph tokens pooled over model seeds. Text positions
    are decoded in the first seed's prompts only (the other seeds add their graph slots): the seeds
    vary the graph tokens, and decoding text under every seed would triple the lens's cost."""
    variants = list(reps[0].config.lens_variants)
    runs = [(r, None, "graph", r is reps[0]) for r in reps] + [(reps[0], v, name, False) for name, v in slots.items()]
    seeds: list[dict] = []
    controls: list[dict] = []
    for rep, value, name, with_text in tqdm(runs, desc="lens conditions", disable=not progress):
        tables = lens_tables(rep, inputs, positions, value, name, variants, with_text, progress)
        (seeds if value is None else controls).append(tables)
    out: dict[str, dict[str, tuple[pd.DataFrame, pd.DataFrame]]] = {}
    for variant in variants:
        out[variant] = {}
        for rows in ("all_layers", "no_embedding_row"):
            graph_pi = pool_seeds([t[variant][rows][0] for t in seeds])
            graph_pl = pool_seeds([t[variant][rows][1] for t in seeds])
            out[variant][rows] = (
                pd.concat([graph_pi, *(t[variant][rows][0] for t in controls)], ignore_index=True),
                pd.concat([graph_pl, *(t[variant][rows][1] for t in controls)], ignore_index=True),
            )
    return out


def summary_means(per_input: pd.DataFrame) -> dict:
    """Mean of each metric per condition: {condition: {metric: mean}}."""
    means = per_input.groupby(["modality", "metric"])["value"].mean()
    return {m: {metric: float(v) for metric, v in means[m].items()} for m in means.index.levels[0] if m in means}


def matched_analysis(
    reps: list[Reproduction], nodes: list[int], inputs: dict, positions: Tensor, progress: bool
) -> dict:
    """Every lens variant x layer rows x condition, with verdicts against the matched controls, the
    projector controls' accuracies and the patching check. Returns a JSON-ready dict with
    ``lens_variants``, ``controls``, ``patching`` and ``curves`` (pooled per-layer values of the
    primary variant, normed lens without the embedding row, for the figure)."""
    rep = reps[0]
    config = rep.config
    slots, accuracy = _conditions(rep, nodes, progress)
    variants, curves = {}, None
    for variant, by_rows in _variant_tables(reps, slots, inputs, positions, progress).items():
        for rows, (per_input, per_layer) in by_rows.items():
            name = f"{variant}/{rows}"
            decision = variant_verdict(per_input, per_layer, list(slots), config.seed)
            variants[name] = {"final_norm": LENS_VARIANTS[variant], "metrics": summary_means(per_input), **decision}
            if name == "normed/no_embedding_row":
                curves = per_layer
    controls = {
        name: {
            "kind": "projector" if name in PROJECTOR_CONTROLS else "slot",
            **({"accuracy": accuracy[name]} if name in accuracy else {}),
        }
        for name in slots
    }
    patch = patching_check(rep, nodes[: config.patching_nodes], progress)
    return {
        "lens_variants": variants,
        "controls": controls,
        "patching": patch.to_dict(orient="records"),
        "curves": None if curves is None else curves.to_dict(orient="records"),
    }
