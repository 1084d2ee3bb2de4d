"""A small graph + text fusion classifier, built from known parts so every component is known.

A GraphSAGE encoder runs over the whole graph; the target node's representation is projected to
K "graph tokens", which are concatenated with the text's token embeddings (graph tokens first)
and run through joint bidirectional blocks (:class:`~mmlens.models.fusion.Block`); a masked
mean-pool over the valid positions feeds a classification head.

Shapes: ``b`` batch, ``T`` text length, ``K`` graph tokens, ``d`` ``d_model``, ``N``/``E`` the
graph's nodes and directed edges, ``f`` node feature width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmlens.models.fusion import Block, FusionOutput
from mmlens.models.tea_glm import GraphSAGEEncoder


@dataclass
class GraphTextConfig:
    """Sizes of a :class:`GraphTextFusion`."""

    node_dim: int = 16
    gnn_dim: int = 64
    n_gnn_layers: int = 2
    n_graph_tokens: int = 2
    vocab_size: int = 64
    max_text_len: int = 16
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 128
    n_layers: int = 2
    n_classes: int = 2

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_graph_tokens < 1:
            raise ValueError(f"n_graph_tokens must be at least 1, got {self.n_graph_tokens}")


class GraphTextFusion(nn.Module):
    """GraphSAGE -> projector -> K graph tokens; ``[graph tokens; text embeddings]`` -> joint blocks
    -> final norm -> masked mean-pool -> head.

    ``fuse`` (an ``nn.Identity``) sees the joint input sequence ``[b, K + T, d]`` once, graph
    positions ``0..K-1`` first, so a hook can read or replace it. Token id 0 is padding with a fixed
    zero embedding, so an all-pad text (the neutral reference) contributes position embeddings only.
    """

    def __init__(self, config: GraphTextConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GraphTextConfig()
        cfg = self.config
        self.gnn = GraphSAGEEncoder(cfg.node_dim, cfg.gnn_dim, cfg.gnn_dim, num_layers=cfg.n_gnn_layers)
        self.projector = nn.Linear(cfg.gnn_dim, cfg.n_graph_tokens * cfg.d_model)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=0)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_text_len, cfg.d_model) * 0.02)
        self.fuse = nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_mlp) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def graph_tokens(self, node_repr: Tensor) -> Tensor:
        """Node representations ``[b, gnn_dim]`` -> graph-token embeddings ``[b, K, d]``."""
        return self.projector(node_repr).view(node_repr.shape[0], self.config.n_graph_tokens, self.config.d_model)

    def forward(
        self,
        node_features: Tensor,
        edge_index: Tensor,
        node_index: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
    ) -> FusionOutput:
        """``node_features`` ``[N, f]``, ``edge_index`` ``[2, E]`` long, ``node_index`` ``[b]`` long
        (each row's target node), ``input_ids`` ``[b, T]``, ``attention_mask`` ``[b, T]`` (1 = token,
        0 = padding) -> :class:`~mmlens.models.fusion.FusionOutput` with ``logits`` ``[b, n_classes]``."""
        cfg = self.config
        if node_features.ndim != 2 or node_features.shape[1] != cfg.node_dim:
            raise ValueError(
                f"node_features has shape {tuple(node_features.shape)}, expected [n_nodes, {cfg.node_dim}] "
                "(one graph for the whole batch; build the model with a matching node_dim)"
            )
        if node_index.shape != (input_ids.shape[0],):
            raise ValueError(
                f"node_index has shape {tuple(node_index.shape)}, expected ({input_ids.shape[0]},): "
                "one target node per text"
            )
        if input_ids.shape[1] > cfg.max_text_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens but max_text_len is {cfg.max_text_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        graph = self.graph_tokens(self.gnn(node_features, edge_index)[node_index])
        text = self.embed(input_ids) + self.pos_embed[: input_ids.shape[1]]
        x = self.fuse(torch.cat([graph, text], dim=1))
        key_mask = torch.cat([attention_mask.new_ones(graph.shape[:2], dtype=torch.bool), attention_mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.final_norm(x)
        weights = key_mask[..., None].to(x.dtype)
        return FusionOutput(logits=self.head((x * weights).sum(dim=1) / weights.sum(dim=1)))
