"""mmlens's own graph + text classifier (:class:`mmlens.models.graph_text.GraphTextFusion`): a GraphSAGE
encoder whose target-node representation becomes K graph tokens, concatenated (graph tokens first)
with the text embeddings into joint transformer blocks."""

from __future__ import annotations

import torch

from mmlens.core.adapter import BATCH, ITEMS, Adapter, Point, Site, Stack
from mmlens.core.spans import spans_from_blocks
from mmlens.core.units import graph_units, token_units
from mmlens.hooks.fusion_transformer import FUSION_BLOCK
from mmlens.metrics.perturb import graph_perturbations, token_perturbations


def block_spans(model, inputs):
    """Graph tokens occupy the first ``n_graph_tokens`` positions, text the rest (minus padding)."""
    ids = inputs["input_ids"]
    return spans_from_blocks(
        ids.shape[0],
        {"graph": model.config.n_graph_tokens, "text": ids.shape[1]},
        {"text": inputs.get("attention_mask")},
        device=ids.device,
    )


def neutral_graph(model, inputs, spans):
    """All node features zero (same graph): every node's representation, hence every graph token,
    is the GNN's and projector's biases alone."""
    return {**inputs, "node_features": torch.zeros_like(inputs["node_features"])}


def neutral_text(model, inputs, spans):
    """Every token set to id 0 (the padding id of the synthetic vocabularies), the mask kept."""
    return {**inputs, "input_ids": torch.zeros_like(inputs["input_ids"])}


GRAPH_TEXT = Adapter(
    name="graph-text-fusion",
    architectures=("GraphTextFusion",),
    stacks=(
        Stack(prefix="graph", stage="encoder", modality="graph", blocks="gnn.convs", layout=None, axes=ITEMS),
        Stack(prefix="lm", stage="lm", modality=None, blocks="blocks", layout=FUSION_BLOCK, n_heads="config.n_heads"),
    ),
    points=(
        Point("text.embed", "encoder", "text", Site("embed")),
        Point("fusion.projector_out", "fusion", "graph", Site("projector"), axes=BATCH),  # [b, K * d]
        Point("fusion.embeds", "fusion", None, Site("fuse"), fused_positions=True),
        Point("lm.final_norm", "lm", None, Site("final_norm"), fused_positions=True),
        Point("lm.logits", "lm", None, Site("head"), axes=BATCH),  # pooled [b, classes]
    ),
    spans=block_spans,
    neutral={"graph": neutral_graph, "text": neutral_text},
    required_inputs=("node_features", "edge_index", "node_index", "input_ids"),
    shared_inputs=("node_features", "edge_index"),
    modality_inputs={"graph": ("node_features", "edge_index", "node_index"), "text": ("input_ids", "attention_mask")},
    perturbations={
        "graph": graph_perturbations(features="node_features", edges="edge_index"),
        "text": token_perturbations("input_ids"),
    },
    readout="mean",  # the head reads the mean of every real position (graph tokens and text)
    input_units={
        "graph": graph_units("node_features", "edge_index", torch.zeros_like),  # neutral_graph's zero features
        "text": token_units("input_ids", neutral_text),
    },
)
