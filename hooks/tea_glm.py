"""TEA-GLM-style graph-language model (:class:`mmlens.models.TeaGLM`): GraphSAGE -> projector ->
K graph tokens spliced into any causal LM, whose own adapter supplies the ``lm.*`` points."""

from __future__ import annotations

import torch

from mmlens.core.adapter import BATCH, ITEMS, Adapter, Point, Site, Stack, vocabulary_size
from mmlens.core.spans import spans_from_token_ids
from mmlens.core.units import graph_units, token_units
from mmlens.hooks.language_models import neutral_text as lm_neutral_text
from mmlens.metrics.perturb import graph_perturbations, token_perturbations


def node_count(inputs):
    """The number of nodes (rows of ``node_features``) that node ids and edges index, if given."""
    features = inputs.get("node_features")
    return features.shape[0] if features is not None else None


def graph_token_spans(model, inputs):
    """Graph positions are the placeholders ``input_ids == model.graph_token_id``."""
    return spans_from_token_ids(inputs["input_ids"], inputs.get("attention_mask"), {"graph": model.graph_token_id})


def neutral_graph(model, inputs, spans):
    """A zero node representation: the graph tokens become the projector's bias alone."""
    batch = inputs["input_ids"].shape[0]
    drop = ("node_features", "edge_index", "node_ids", "graph_embeds")
    zeros = torch.zeros(batch, model.gnn.out_dim, device=inputs["input_ids"].device)
    return {**{k: v for k, v in inputs.items() if k not in drop}, "graph_embeds": zeros}


def neutral_text(model, inputs, spans):

    return lm_neutral_text(model.lm, inputs, spans)


def project_graph_layer(model, inputs, hidden):
    """A GNN layer's node representations ``[n_nodes, d]`` -> each prompt's K graph tokens
    ``[b, K, d_lm]`` (rows ``node_ids``, through the projector); needs ``d == gnn.out_dim``."""
    if "node_ids" not in inputs:
        raise ValueError(
            "decoding GNN layers needs the graph inputs (node_features, edge_index, node_ids), not graph_embeds"
        )
    if hidden.shape[-1] != model.gnn.out_dim:
        raise ValueError(
            f"this GNN layer is {hidden.shape[-1]} wide but the projector reads {model.gnn.out_dim}; "
            "only layers as wide as the GNN output can be projected (use hidden_dim == out_dim)"
        )
    return model.graph_tokens(hidden[inputs["node_ids"]])


TEA_GLM = Adapter(
    name="tea-glm",
    architectures=("TeaGLM",),
    stacks=(Stack(prefix="graph", stage="encoder", modality="graph", blocks="gnn.convs", layout=None, axes=ITEMS),),
    points=(
        Point("fusion.projector_out", "fusion", "graph", Site("projector"), axes=BATCH),  # [b, K * d]
        Point("fusion.embeds", "fusion", None, Site("lm", "input", 0, "inputs_embeds"), fused_positions=True),
    ),
    nested=("lm",),
    spans=graph_token_spans,
    neutral={"graph": neutral_graph, "text": neutral_text},
    shared_inputs=("node_features", "edge_index"),
    modality_inputs={
        "graph": ("node_features", "edge_index", "node_ids", "graph_embeds"),
        "text": ("input_ids", "attention_mask"),
    },
    perturbations={
        "graph": graph_perturbations(features="node_features", edges="edge_index", embeds="graph_embeds"),
        "text": token_perturbations("input_ids"),
    },
    project_encoder=project_graph_layer,
    index_inputs={
        "input_ids": lambda model, inputs: vocabulary_size(model.lm, inputs),
        "node_ids": lambda model, inputs: node_count(inputs),
        "edge_index": lambda model, inputs: node_count(inputs),
    },
    input_units={
        # a removed node's features are zero (the neutral graph is a zero node representation, past the GNN)
        "graph": graph_units("node_features", "edge_index", torch.zeros_like),
        "text": token_units("input_ids", neutral_text),
    },
)
