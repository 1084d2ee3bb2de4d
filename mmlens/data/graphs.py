"""Text-attributed graphs for the TEA-GLM analyses: the real Cora citation graph (TAPE format) and a
seeded synthetic stand-in, stratified splits, and cheap LM-space node features.

Shapes: ``n`` nodes, ``E`` directed edges (each undirected edge stored in both directions),
``d`` the LM's embedding width, ``vocab`` its vocabulary size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected
from transformers import PreTrainedTokenizerBase

from mmlens.data.paths import data_dir as resolve_data_dir

DATASETS = ("cora", "synthetic")

CORA_CLASS_WORDS = {
    "Rule_Learning": "rule learning",
    "Neural_Networks": "neural networks",
    "Case_Based": "case based reasoning",
    "Genetic_Algorithms": "genetic algorithms",
    "Theory": "theory",
    "Reinforcement_Learning": "reinforcement learning",
    "Probabilistic_Methods": "probabilistic methods",
}

# Topic words of the synthetic graph's classes, in CORA_CLASS_WORDS order.
_SYNTHETIC_TOPICS = (
    ("rules", "clauses", "induction", "logic", "predicates", "decision", "trees", "concepts"),
    ("neurons", "layers", "backpropagation", "weights", "perceptron", "hidden", "units", "training"),
    ("cases", "retrieval", "similarity", "memory", "adaptation", "analogy", "precedents", "reuse"),
    ("genes", "mutation", "crossover", "population", "fitness", "evolution", "chromosomes", "selection"),
    ("bounds", "complexity", "theorem", "proof", "sample", "dimension", "lemma", "learnability"),
    ("reward", "agent", "policy", "actions", "states", "exploration", "value", "environment"),
    ("bayesian", "probability", "inference", "posterior", "networks", "sampling", "likelihood", "prior"),
)
_SYNTHETIC_FILLER = (
    "we",
    "present",
    "a",
    "new",
    "method",
    "for",
    "the",
    "problem",
    "of",
    "results",
    "show",
    "that",
    "approach",
    "is",
    "paper",
    "this",
    "in",
    "and",
    "data",
    "model",
    "on",
    "with",
    "experiments",
    "performance",
    "study",
    "using",
    "propose",
    "algorithm",
    "learning",
    "based",
)


@dataclass
class TextAttributedGraph:
    """A graph whose nodes carry text and a class label.

    Attributes:
        texts: full node text, ``"Title. : Abstract"`` style, ``n`` strings.
        titles: the title part of each text.
        labels: ``[n]`` long class ids into ``class_names``.
        edge_index: ``[2, E]`` long; deduplicated, both directions, no self loops.
        class_names: class names as stored in the data (e.g. ``"Rule_Learning"``).
        class_words: human-readable lower-case phrases for prompts (e.g. ``"rule learning"``).
        name: ``"cora"`` or ``"synthetic"``.
        source: the file read, or ``"generated (seed=S)"``.
    """

    texts: list[str]
    titles: list[str]
    labels: Tensor
    edge_index: Tensor
    class_names: list[str]
    class_words: list[str]
    name: str
    source: str

    @property
    def synthetic(self) -> bool:
        """Whether the graph was generated rather than read from data."""
        return self.name == "synthetic"

    @property
    def num_nodes(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def majority_baseline(self, indices: Tensor | None = None) -> float:
        """Accuracy of always predicting the most frequent class among ``indices`` (default all)."""
        labels = self.labels if indices is None else self.labels[indices]
        if labels.numel() == 0:
            raise ValueError("majority_baseline needs at least one node; got an empty index set")
        return torch.bincount(labels, minlength=self.num_classes).max().item() / labels.numel()


def load_text_attributed_graph(
    dataset: str = "cora", data_dir: str | os.PathLike | None = None, seed: int = 0, num_nodes: int = 700
) -> TextAttributedGraph:
    """Load ``"cora"`` (2,708 papers, 7 classes) or generate ``"synthetic"`` (``num_nodes`` nodes,
    7 planted communities, from ``seed``).

    Cora is read from ``cora_tag/cora.json`` and ``cora_tag/labels.json`` under ``data_dir``, else
    ``MMLENS_DATA``, else the copy bundled with mmlens (:mod:`mmlens.data.paths`); ``data_dir``
    may also be the folder holding ``cora.json`` itself. ``seed`` and ``num_nodes`` only affect
    ``"synthetic"``.
    """
    if dataset == "cora":
        return _load_cora(_find_cora(data_dir))
    if dataset == "synthetic":
        return _synthetic_graph(seed, num_nodes)
    raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")


def _find_cora(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding ``cora.json``; raises FileNotFoundError listing every path it tried."""
    try:
        base = resolve_data_dir(data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; or run with --dataset synthetic, which needs no data") from None
    looked: list[Path] = []
    for folder in (base / "cora_tag", base):
        looked.append(folder / "cora.json")
        if looked[-1].is_file():
            return folder
    raise FileNotFoundError(
        "text-attributed Cora not found; looked for: "
        + ", ".join(str(p) for p in looked)
        + ". It needs DIR/cora_tag/cora.json ({'raw_texts': [2708 'Title. : Abstract' strings], "
        "'y': [2708 class ids], 'edge_index': [[src...], [dst...]]}) and DIR/cora_tag/labels.json "
        "({'labels': [7 class names]}), i.e. the TAPE-format text-attributed Cora (downloadable "
        "online). Provide it with --data-dir DIR or MMLENS_DATA=DIR, or run with --dataset "
        "synthetic, which needs no data."
    )


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: labels.json must sit next to cora.json and hold {{'labels': [one name per class]}}"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-download the file") from None


def _load_cora(folder: Path) -> TextAttributedGraph:
    path = folder / "cora.json"
    raw = _read_json(path)
    missing = [key for key in ("raw_texts", "y", "edge_index") if key not in raw]
    if missing:
        raise ValueError(
            f"{path} lacks keys {missing}; expected 'raw_texts', 'y' and 'edge_index' "
            "(the TAPE text-attributed Cora format)"
        )
    texts, y, edges = raw["raw_texts"], raw["y"], raw["edge_index"]
    class_names = _read_json(folder / "labels.json").get("labels")
    if not isinstance(class_names, list) or not class_names:
        raise ValueError(f"{folder / 'labels.json'} must hold {{'labels': [class names]}}")
    if len(texts) != len(y):
        raise ValueError(f"{path}: {len(texts)} raw_texts but {len(y)} labels 'y'; they must match")
    labels = torch.tensor(y, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"{path}: labels range over [{labels.min().item()}, {labels.max().item()}] but "
            f"labels.json names {len(class_names)} classes"
        )
    edge_index = torch.tensor(edges, dtype=torch.long)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{path}: edge_index must be [[src...], [dst...]], got shape {tuple(edge_index.shape)}")
    if edge_index.numel() and (edge_index.min() < 0 or edge_index.max() >= len(texts)):
        raise ValueError(f"{path}: edge_index refers to nodes outside [0, {len(texts)})")
    return TextAttributedGraph(
        texts=texts,
        titles=[extract_title(t) for t in texts],
        labels=labels,
        edge_index=_clean_edges(edge_index, len(texts)),
        class_names=class_names,
        class_words=[CORA_CLASS_WORDS.get(c, c.replace("_", " ").lower()) for c in class_names],
        name="cora",
        source=str(path),
    )


def extract_title(text: str, max_chars: int = 300) -> str:
    """The title part of a Cora text.

    The TAPE texts are ``"Title. : Abstract"`` but about a third use another separator
    (``"Title: Abstract"``, ``"Title, : Abstract"``). Takes the text before ``" : "`` if it occurs
    within ``max_chars`` characters, else before the first ``":"`` there, else the first sentence;
    then strips whitespace, quotes and trailing punctuation. A few texts have no title and start
    with the separator; their first phrase stands in.
    """
    head = text.lstrip(' :"')[:max_chars]
    for sep in (" : ", ":", ". "):
        if sep in head:
            head = head.split(sep, 1)[0]
            break
    return head.strip().strip("\"'").rstrip(" .,;:").strip().strip("\"'")


def _clean_edges(edge_index: Tensor, num_nodes: int) -> Tensor:
    """``[2, E]`` -> deduplicated, symmetric, self-loop-free ``[2, E']``."""
    edge_index, _ = remove_self_loops(edge_index)
    return coalesce(to_undirected(edge_index, num_nodes=num_nodes), num_nodes=num_nodes)


def _synthetic_graph(
    seed: int, num_nodes: int, p_in: float = 0.03, p_out: float = 0.002, text_noise: float = 0.25
) -> TextAttributedGraph:
    """A stochastic block model with 7 communities (the Cora classes) and bag-of-words texts.

    Each node's text is written from its own class's topic words with probability
    ``1 - text_noise``, else from a random class's, so text alone cannot classify every node.
    """
    if num_nodes < 7:
        raise ValueError(f"the synthetic graph needs at least 7 nodes (one per class), got {num_nodes}")
    g = torch.Generator().manual_seed(seed)
    names = list(CORA_CLASS_WORDS)
    k = len(names)
    labels = torch.cat([torch.arange(k), torch.randint(0, k, (num_nodes - k,), generator=g)])
    labels = labels[torch.randperm(num_nodes, generator=g)]

    same = labels[:, None] == labels[None, :]
    prob = torch.where(same, p_in, p_out)
    upper = torch.triu(torch.rand(num_nodes, num_nodes, generator=g) < prob, diagonal=1)
    edge_index = _clean_edges(upper.nonzero().t(), num_nodes)

    flip = torch.rand(num_nodes, generator=g) < text_noise
    text_class = torch.where(flip, torch.randint(0, k, (num_nodes,), generator=g), labels)

    def words(topic: Sequence[str], count: int, p_topic: float) -> list[str]:
        is_topic = (torch.rand(count, generator=g) < p_topic).tolist()
        t = torch.randint(0, len(topic), (count,), generator=g).tolist()
        f = torch.randint(0, len(_SYNTHETIC_FILLER), (count,), generator=g).tolist()
        return [topic[i] if use else _SYNTHETIC_FILLER[j] for use, i, j in zip(is_topic, t, f)]

    titles, texts = [], []
    for c in text_class.tolist():
        topic = _SYNTHETIC_TOPICS[c]
        title = " ".join(words(topic, 4, 0.6)).capitalize()
        abstract = " ".join(words(topic, 20, 0.3)).capitalize()
        titles.append(title)
        texts.append(f"{title}. : {abstract}.")
    return TextAttributedGraph(
        texts=texts,
        titles=titles,
        labels=labels,
        edge_index=edge_index,
        class_names=names,
        class_words=list(CORA_CLASS_WORDS.values()),
        name="synthetic",
        source=f"generated (seed={seed})",
    )


def stratified_split(
    labels: Tensor, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> dict[str, Tensor]:
    """Split node ids ``[n]`` into disjoint sorted ``train``/``val``/``test`` long tensors covering
    all nodes, each class divided in proportion to ``fractions`` (rounded down for val and test)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"train": [], "val": [], "test": []}
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = int(fractions[1] * idx.numel())
        n_test = int(fractions[2] * idx.numel())
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val : n_val + n_test])
        parts["train"].append(idx[n_val + n_test :])
    return {name: torch.sort(torch.cat(p))[0] for name, p in parts.items()}


def text_features(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, embedding_matrix: Tensor, max_tokens: int = 256
) -> Tensor:
    """Node features ``[n, d]`` (float32, CPU): each text's IDF-weighted mean input-token embedding,
    standardised.

    Each text is tokenized (no special tokens, first ``max_tokens`` tokens) and its tokens'
    rows of ``embedding_matrix`` ``[vocab, d]`` are averaged with weight ``tf * idf``, where
    ``idf = log((1 + N) / (1 + df)) + 1`` over these ``N`` texts, so frequent function words count
    little. Each dimension is then shifted and scaled to zero mean, unit std over nodes (constant
    dimensions become 0). A text without tokens gives a zero row before standardisation.

    Why: it costs one tokenizer pass and one sparse matmul (no LM forward), and the features live
    in the LM's own embedding space, which the TEA-GLM GNN is trained to stay aligned with.
    """
    if len(texts) < 2:
        raise ValueError(f"text_features standardises over nodes: needs at least 2 texts, got {len(texts)}")
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
    ids = encoded["input_ids"]
    n, vocab = len(ids), embedding_matrix.shape[0]
    rows = torch.repeat_interleave(torch.arange(n), torch.tensor([len(i) for i in ids], dtype=torch.long))
    cols = torch.tensor([t for i in ids for t in i], dtype=torch.long)
    if cols.numel() and cols.max() >= vocab:
        raise ValueError(
            f"tokenizer produced id {cols.max().item()} but embedding_matrix has {vocab} rows; "
            "pass the input embeddings of the LM this tokenizer belongs to"
        )
    counts = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), torch.ones(cols.numel()), (n, vocab), check_invariants=True
    ).coalesce()
    (doc, tok), tf = counts.indices(), counts.values()
    idf = torch.log((1 + n) / (1 + torch.bincount(tok, minlength=vocab).float())) + 1
    w = tf * idf[tok]
    weights = torch.sparse_coo_tensor(torch.stack([doc, tok]), w, (n, vocab), check_invariants=True)
    total = torch.zeros(n).index_add_(0, doc, w).clamp_min(1e-12)
    feats = torch.sparse.mm(weights, embedding_matrix.detach().float().cpu()) / total[:, None]
    std = feats.std(dim=0, keepdim=True)
    return torch.where(std > 1e-8, (feats - feats.mean(dim=0, keepdim=True)) / std.clamp_min(1e-8), 0.0)


def build_graph_prompt(
    tokenizer: PreTrainedTokenizerBase, before: str, after: str, graph_token_id: int, num_graph_tokens: int = 5
) -> list[int]:
    """Token ids of ``before`` (with the tokenizer's special tokens, e.g. BOS), then
    ``num_graph_tokens`` placeholders, then ``after`` (without special tokens)."""
    return (
        tokenizer.encode(before)
        + [graph_token_id] * num_graph_tokens
        + tokenizer.encode(after, add_special_tokens=False)
    )


def default_graph_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """An existing token id to use as the graph placeholder, so the LM's embeddings need no resize.

    TeaGLM overwrites the placeholder's embedding, so which token it is does not matter as long as
    it does not occur in the prompt text. Prefers the unk token, then pad, then eos.
    """
    for token_id in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(
        "tokenizer has no unk, pad or eos token to reuse as the graph placeholder; "
        "pass graph_token_id explicitly (any id that does not occur in your prompts)"
    )
