"""A TEA-GLM-style graph-language model: a GraphSAGE encoder whose node representation is
projected to K "graph token" embeddings that replace K placeholder tokens in a frozen causal LM's
prompt (Wang et al., NeurIPS 2024, "LLMs as Zero-shot Graph Learners").

Shapes: ``b`` batch, ``seq`` prompt length, ``K`` graph tokens per prompt, ``d_lm`` the LM's
embedding width, ``n_nodes``/``n_edges`` the graph's size.
"""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from transformers import PreTrainedModel
from transformers.utils import ModelOutput


class GraphSAGEEncoder(nn.Module):
    """A stack of ``SAGEConv`` layers with ReLU and dropout between layers (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.convs = nn.ModuleList(SAGEConv(d_in, d_out) for d_in, d_out in itertools.pairwise(dims))
        self.dropout = dropout
        self.out_dim = out_dim

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Node features ``[n_nodes, in_dim]`` and edges ``[2, n_edges]`` (long) ->
        node representations ``[n_nodes, out_dim]``."""
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = F.dropout(F.relu(x), p=self.dropout, training=self.training)
        return x


class TeaGLM(nn.Module):
    """GNN -> linear projector -> K graph-token embeddings spliced into a causal LM's prompt.

    ``projector`` maps one node representation ``[gnn.out_dim]`` to ``K * d_lm`` values, read as K
    embeddings. They overwrite the input embeddings at the prompt positions holding
    ``graph_token_id``, and the LM runs on ``inputs_embeds``.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        gnn: GraphSAGEEncoder,
        graph_token_id: int,
        num_graph_tokens: int = 5,
        freeze_lm: bool = True,
    ) -> None:
        super().__init__()
        if num_graph_tokens < 1:
            raise ValueError(f"num_graph_tokens must be at least 1, got {num_graph_tokens}")
        self.gnn = gnn
        d_lm = lm.get_input_embeddings().embedding_dim
        self.projector = nn.Linear(gnn.out_dim, num_graph_tokens * d_lm)
        self.lm = lm
        self.graph_token_id = graph_token_id
        self.num_graph_tokens = num_graph_tokens
        if freeze_lm:
            self.lm.requires_grad_(False)

    @property
    def d_model(self) -> int:
        """The LM's embedding width ``d_lm``."""
        return self.lm.get_input_embeddings().embedding_dim

    def graph_tokens(self, node_repr: Tensor) -> Tensor:
        """Node representations ``[b, gnn.out_dim]`` -> graph-token embeddings ``[b, K, d_lm]``."""
        return self.projector(node_repr).view(node_repr.shape[0], self.num_graph_tokens, self.d_model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        node_features: Tensor | None = None,
        edge_index: Tensor | None = None,
        node_ids: Tensor | None = None,
        graph_embeds: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> ModelOutput:
        """Run the LM on prompts whose placeholders hold each row's graph tokens.

        Args:
            input_ids: ``[b, seq]`` long; each row holds exactly K ``graph_token_id`` placeholders.
            attention_mask: ``[b, seq]``, passed to the LM.
            node_features, edge_index, node_ids: route 1, run the GNN: ``[n_nodes, in_dim]``,
                ``[2, n_edges]`` long and ``[b]`` long (the node each prompt is about).
            graph_embeds: route 2, node representations given directly, ``[b, gnn.out_dim]``.
            labels: ``[b, seq]``, passed to the LM (use -100 at placeholder positions).

        Returns:
            The LM's output; ``logits`` is ``[b, seq, vocab]``.
        """
        mask = input_ids == self.graph_token_id
        counts = mask.sum(dim=1)
        if (counts != self.num_graph_tokens).any():
            raise ValueError(
                f"every prompt needs exactly {self.num_graph_tokens} graph placeholder tokens "
                f"(id {self.graph_token_id}); found {counts.tolist()} per row. Build prompts with "
                "mmlens.data.graphs.build_graph_prompt and keep the placeholder id out of the surrounding text."
            )
        gnn_inputs = (node_features, edge_index, node_ids)
        if graph_embeds is not None and any(t is not None for t in gnn_inputs):
            raise ValueError("pass either graph_embeds or (node_features, edge_index, node_ids), not both")
        if graph_embeds is None:
            if any(t is None for t in gnn_inputs):
                raise ValueError(
                    "missing graph input: pass node_features, edge_index and node_ids together "
                    "(to run the GNN), or graph_embeds of shape [batch, gnn.out_dim]"
                )
            node_repr = self.gnn(node_features, edge_index)[node_ids]
        else:
            node_repr = graph_embeds
        if node_repr.shape != (input_ids.shape[0], self.gnn.out_dim):
            raise ValueError(
                f"node representations have shape {tuple(node_repr.shape)}, expected "
                f"({input_ids.shape[0]}, {self.gnn.out_dim}): one node (node_ids) or one "
                "graph_embeds row per prompt, of width gnn.out_dim"
            )

        inputs_embeds = self.lm.get_input_embeddings()(input_ids)
        tokens = self.graph_tokens(node_repr).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], tokens)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
