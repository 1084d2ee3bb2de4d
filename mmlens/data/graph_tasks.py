"""Seeded graph + text classification tasks whose dependence on each modality is known by construction.

Every example is (graph, target node, text). The graph of a task is one stochastic-block-model
draw shared by all its examples: :data:`N_NODES` nodes in :data:`N_COMMUNITIES` equal planted
communities, an edge between two nodes with probability :data:`P_IN` inside a community and
:data:`P_OUT` across (about 25 neighbours inside and 4 outside per node). Half the nodes of each
community are *context* nodes, whose :data:`FEATURE_DIM` features are ``SIGNAL * e_community +
N(0, 1)``; the other half are *query* nodes, whose features are pure ``N(0, 1)`` noise. Examples are
about query nodes only, so a target's own features say nothing about its community, while the
mean of its neighbours' features (mostly same-community context nodes) reveals it: the
neighbourhood is what matters (:func:`centroid_accuracy`). Texts are short sentences over
:data:`VOCAB` (id 0 = padding, padded at the end).

======================  ===============================================================  ==============
task                    label                                                            ``depends_on``
======================  ===============================================================  ==============
``graph_only``          the target node's community (4 classes); the text is filler      graph
``graph_text_synergy``  "yes" iff the side word in the text ("low" / "high") names the   graph, text
                        target's side (communities 0, 1 are "low", 2, 3 "high"): an XOR,
                        neither modality alone beats 50%
======================  ===============================================================  ==============

>>> task = make_graph_task("graph_text_synergy", n=1000, seed=0)
>>> task.batch(range(4))   # {"node_features": [1000, 16], "edge_index": [2, E], "node_index": [4],
...                        #  "input_ids": [4, 8], "attention_mask": [4, 8]}
>>> bayes_accuracy(task, "graph")   # ~0.5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mmlens.data.tasks import SyntheticTask, bayes_accuracy, generate, texts

N_NODES = 1000
"""Nodes per graph."""
N_COMMUNITIES = 4
P_IN, P_OUT = 0.1, 0.005
"""Edge probabilities inside a community and across communities."""
FEATURE_DIM = 16
"""Node feature width."""
SIGNAL = 2.0
"""A context node's mean feature is ``SIGNAL * e_community`` (one-hot in the first 4 dims); noise std 1."""
TEXT_LEN = 8
"""Token positions per text (sentences have 3..8 words, then padding)."""

SIDES = ("low", "high")
"""Side words: communities 0, 1 are the "low" side, 2, 3 the "high" side."""
FILLERS = (
    "the",
    "a",
    "this",
    "that",
    "is",
    "node",
    "paper",
    "user",
    "in",
    "of",
    "on",
    "graph",
    "network",
    "which",
    "does",
    "it",
    "belong",
    "to",
    "group",
    "cluster",
    "community",
    "where",
    "and",
    "with",
    "link",
    "friend",
    "here",
    "see",
    "what",
    "some",
)
VOCAB: tuple[str, ...] = ("<pad>", *SIDES, *FILLERS)
"""id -> word; id 0 is padding (the adapter's neutral text)."""
WORD_ID = {word: i for i, word in enumerate(VOCAB)}

_FILLER_IDS = np.array([WORD_ID[w] for w in FILLERS])
GRAPH_TASK_KINDS = ("graph_only", "synergistic")
"""The kinds of dependence of the graph + text tasks (``GraphTaskData.kind``)."""


@dataclass
class GraphTaskData(SyntheticTask):
    """A graph + text task: ``n`` examples about nodes of one graph of ``N`` nodes and ``E``
    directed edges (each undirected edge both ways); ``T`` = :data:`TEXT_LEN`; ``kind`` is one of
    :data:`GRAPH_TASK_KINDS`; modalities "graph" and "text". :meth:`batch` gives
    ``{"node_features", "edge_index", "node_index", "input_ids", "attention_mask"}``, the whole
    graph with every batch. Position-level truth (:meth:`key_positions`): every graph token (each
    encodes the target's neighbourhood, which decides its community) and the side word.

    Attributes:
        node_features: Float[N, FEATURE_DIM]; edge_index: Long[2, E]; communities: Long[N];
            is_query: Bool[N], the nodes with pure-noise features (the only targets).
        node_index: Long[n], each example's target node.
        graph_attrs: "community": the target's community, Long[n].
        text_attrs: "side": the side word of each text (index into :data:`SIDES`).
    """

    INPUTS: ClassVar[tuple[str, ...]] = ("node_features", "edge_index", "node_index", "input_ids", "attention_mask")
    SHARED: ClassVar[tuple[str, ...]] = ("node_features", "edge_index", "communities", "is_query")
    MODALITIES: ClassVar[tuple[str, ...]] = ("graph", "text")

    node_features: Tensor
    edge_index: Tensor
    communities: Tensor
    is_query: Tensor
    node_index: Tensor
    graph_attrs: dict[str, Tensor]


# --- generation --------------------------------------------------------------------------------------


def _graph(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One SBM draw: balanced communities and query/context roles, undirected edges without self loops,
    node features (see the module docstring)."""
    role = rng.permutation(N_NODES)
    communities = role % N_COMMUNITIES
    is_query = (role // N_COMMUNITIES) % 2 == 0
    same = communities[:, None] == communities[None, :]
    adjacency = np.triu(rng.random((N_NODES, N_NODES)) < np.where(same, P_IN, P_OUT), k=1)
    src, dst = adjacency.nonzero()
    means = SIGNAL * np.eye(N_COMMUNITIES, FEATURE_DIM)[communities] * ~is_query[:, None]
    features = means + rng.normal(0, 1, (N_NODES, FEATURE_DIM))
    return {
        "node_features": features.astype(np.float32),
        "edge_index": np.stack([np.r_[src, dst], np.r_[dst, src]]),
        "communities": communities,
        "is_query": is_query,
    }


def _examples(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The graph, then ``n`` target nodes drawn uniformly (with replacement) from its query nodes."""
    graph = _graph(rng)
    return graph, rng.choice(graph["is_query"].nonzero()[0], n)


def _task(
    name: str,
    kind: str,
    depends_on: set[str],
    rule: str,
    rng: np.random.Generator,
    seed: int,
    graph: dict[str, np.ndarray],
    node_index: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    text: dict[str, np.ndarray],
    key_word: np.ndarray | None,
) -> GraphTaskData:
    ids, mask, text_key = texts(rng, key_word, len(labels), _FILLER_IDS, TEXT_LEN, 3)
    return GraphTaskData(
        name=name,
        kind=kind,
        depends_on=frozenset(depends_on),
        rule=rule,
        **{k: torch.from_numpy(v) for k, v in graph.items()},
        node_index=torch.from_numpy(node_index),
        input_ids=ids,
        attention_mask=mask,
        labels=torch.from_numpy(labels),
        class_names=class_names,
        vocab=VOCAB,
        graph_attrs={"community": torch.from_numpy(graph["communities"][node_index])},
        text_attrs={k: torch.from_numpy(v) for k, v in text.items()},
        text_key=text_key,
        seed=seed,
    )


# --- the tasks ---------------------------------------------------------------------------------------


def graph_only(n: int, seed: int) -> GraphTaskData:
    """Label: the target node's community (4 classes); the text is filler words."""
    rng = np.random.default_rng(seed)
    graph, nodes = _examples(rng, n)
    community = graph["communities"][nodes]
    return _task(
        "graph_only",
        "graph_only",
        {"graph"},
        "label = the target node's community",
        rng,
        seed,
        graph,
        nodes,
        community,
        tuple(f"community {c}" for c in range(N_COMMUNITIES)),
        {},
        None,
    )


def graph_text_synergy(n: int, seed: int) -> GraphTaskData:
    """Label: 1 ("yes") iff the side word of the text ("low" / "high", uniform) names the target's
    side (community // 2): ``label = 1 - (side XOR word)``; each alone is independent of it."""
    rng = np.random.default_rng(seed)
    graph, nodes = _examples(rng, n)
    side, word = graph["communities"][nodes] // 2, rng.integers(0, 2, n)
    return _task(
        "graph_text_synergy",
        "synergistic",
        {"graph", "text"},
        "label = yes iff the side word in the text (low/high) names the target node's side "
        "(communities 0-1 low, 2-3 high)",
        rng,
        seed,
        graph,
        nodes,
        (side == word).astype(np.int64),
        ("no", "yes"),
        {"side": word},
        np.array([WORD_ID[s] for s in SIDES])[word],
    )


GRAPH_TASKS: dict[str, Callable[[int, int], GraphTaskData]] = {
    "graph_only": graph_only,
    "graph_text_synergy": graph_text_synergy,
}
"""Task name -> generator ``(n, seed) -> GraphTaskData``."""


def make_graph_task(name: str, n: int, seed: int = 0) -> GraphTaskData:
    """``n`` examples of task ``name`` (a key of :data:`GRAPH_TASKS`) on one graph, a function of
    ``(name, n, seed)`` only; the graph depends on ``seed`` alone (both tasks share it)."""
    return generate(GRAPH_TASKS, name, n, seed, "synthetic graph task")


def centroid_accuracy(task: GraphTaskData, source: str) -> float:
    """How well the targets' communities can be read from features by the nearest community mean
    (argmax over the first :data:`N_COMMUNITIES` feature dims): ``source="self"`` the target's own
    features, ``"neighbours"`` the mean of its neighbours' features (0 for isolated nodes)."""
    x = task.node_features
    if source == "neighbours":
        src, dst = task.edge_index
        degree = torch.bincount(dst, minlength=len(x)).clamp_min(1)
        x = torch.zeros_like(x).index_add_(0, dst, x[src]) / degree[:, None]
    elif source != "self":
        raise ValueError(f"source must be 'self' or 'neighbours', got {source!r}")
    guess = x[task.node_index, :N_COMMUNITIES].argmax(1)
    return float((guess == task.graph_attrs["community"]).float().mean())


__all__ = [
    "FEATURE_DIM",
    "FILLERS",
    "GRAPH_TASKS",
    "GRAPH_TASK_KINDS",
    "N_COMMUNITIES",
    "N_NODES",
    "P_IN",
    "P_OUT",
    "SIDES",
    "SIGNAL",
    "TEXT_LEN",
    "VOCAB",
    "WORD_ID",
    "GraphTaskData",
    "bayes_accuracy",
    "centroid_accuracy",
    "graph_only",
    "graph_text_synergy",
    "make_graph_task",
]
