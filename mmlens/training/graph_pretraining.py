"""TEA-GLM's self-supervised GNN pretraining (Wang et al., NeurIPS 2024): an instance-level
GRACE contrast between two augmented views plus a feature-level contrast in the LLM's token space.

The feature-level loss projects node representations onto the top principal components of the
LLM's token-embedding table, so the GNN must output vectors of the LLM's width ``d_lm`` and its
features line up with directions the LLM already uses.

Shapes: ``n`` nodes, ``E`` edges, ``d_lm`` the LLM's width (= the GNN's output width), ``c``
principal components, ``k`` projection-head width.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import coalesce, to_torch_csr_tensor

from mmlens.models.tea_glm import GraphSAGEEncoder
from mmlens.training.loop import Checkpoint, fit

# Config fields that may change between a checkpointed run and its resumption.
_RESUMABLE_CHANGES = {"epochs", "checkpoint_every"}


@dataclass
class GraphPretrainConfig:
    """Hyperparameters of :func:`pretrain_graph_encoder`.

    ``drop_edge`` and ``mask_feature`` hold the per-view probabilities of dropping an edge and of
    zeroing a feature column (view 1, view 2). ``n_components`` is ``c``, the number of LLM
    principal components in the feature loss (TEA-GLM used 1000 with a 4096-wide LLM). ``tau`` is
    the softmax temperature of both losses. ``hidden_dim`` and ``num_layers`` describe the GNN
    passed in (checked, and recorded in checkpoints).
    """

    hidden_dim: int = 576
    num_layers: int = 2
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    tau: float = 0.5
    drop_edge: tuple[float, float] = (0.2, 0.4)
    mask_feature: tuple[float, float] = (0.3, 0.4)
    n_components: int = 64
    feature_loss_weight: float = 1.0
    proj_dim: int = 128
    seed: int = 0
    checkpoint_every: int = 10

    def to_dict(self) -> dict:
        """The fields as a plain dict (tuples kept), e.g. for JSON run records."""
        return asdict(self)


def llm_principal_components(embedding_matrix: Tensor, n_components: int) -> Tensor:
    """Top principal directions ``[d, c]`` (float32, orthonormal columns, by decreasing variance)
    of an LLM's token-embedding table ``[vocab, d]``, after centering it over the vocabulary.

    Signs are fixed so that each column's largest-magnitude entry is positive.
    """
    d = embedding_matrix.shape[1]
    if not 1 <= n_components <= d:
        raise ValueError(f"n_components must be in [1, {d}] (the embedding width), got {n_components}")
    emb = embedding_matrix.detach().float()
    centered = emb - emb.mean(dim=0, keepdim=True)
    cov = (centered.T @ centered).double()
    _, vecs = torch.linalg.eigh(cov)
    top = vecs[:, -n_components:].flip(1)
    pivot = top.gather(0, top.abs().argmax(dim=0, keepdim=True))
    return (top * torch.sign(pivot)).float()


class _NTXent(torch.autograd.Function):
    """Symmetrised NT-Xent of unit rows ``a``, ``b`` ``[m, k]`` with a hand-written backward.

    Same value and gradient as the textbook form (logsumexp over cross- and same-view
    similarities), but it keeps only three ``[m, m]`` buffers, exponentiated in place, which makes
    the GRACE loss on a whole 2,708-node graph several times faster on a CPU. Similarities are
    shifted by their maximum 1 before ``exp``, so ``exp(t * (s - 1))`` lies in ``[exp(-2t), 1]``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, t: float) -> Tensor:
        tiny = torch.finfo(a.dtype).tiny
        e_ab = (a @ b.T).sub_(1).mul_(t).exp_()
        e_aa = (a @ a.T).sub_(1).mul_(t).exp_().fill_diagonal_(0)
        e_bb = (b @ b.T).sub_(1).mul_(t).exp_().fill_diagonal_(0)
        inv_a = 1 / (e_ab.sum(dim=1) + e_aa.sum(dim=1)).clamp_min(tiny)
        inv_b = 1 / (e_ab.sum(dim=0) + e_bb.sum(dim=1)).clamp_min(tiny)
        positives = (a * b).sum(dim=1)
        ctx.save_for_backward(a, b, e_ab, e_aa, e_bb, inv_a, inv_b)
        ctx.t = t
        return 0.5 * (-(inv_a.log() + inv_b.log()).mean() - 2 * t * (positives - 1).mean())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        # d loss / d a_i = (t / 2m) [sum_j e_ab[i,j] (inv_a[i] + inv_b[j]) b_j
        #                          + sum_j e_aa[i,j] (inv_a[i] + inv_a[j]) a_j - 2 b_i], b alike;
        # each weighted sum is one matmul against [v, inv * v] (cheaper here than forming weights).
        a, b, e_ab, e_aa, e_bb, inv_a, inv_b = ctx.saved_tensors
        k = a.shape[1]
        a_w = torch.cat([a, inv_a[:, None] * a], dim=1)
        b_w = torch.cat([b, inv_b[:, None] * b], dim=1)

        def pull(e: Tensor, inv: Tensor, rhs: Tensor) -> Tensor:
            out = e @ rhs
            return inv[:, None] * out[:, :k] + out[:, k:]

        grad_a = pull(e_ab, inv_a, b_w) + pull(e_aa, inv_a, a_w) - 2 * b
        grad_b = pull(e_ab.T, inv_b, a_w) + pull(e_bb, inv_b, b_w) - 2 * a
        scale = grad * 0.5 * ctx.t / a.shape[0]
        return scale * grad_a, scale * grad_b, None


def _nt_xent(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Symmetrised NT-Xent over the rows of ``a`` and ``b`` ``[m, k]``: row i of one view is the
    positive of row i of the other; every other row of both views is a negative."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return _NTXent.apply(F.normalize(a, dim=1), F.normalize(b, dim=1), 1 / tau)


def grace_loss(z1: Tensor, z2: Tensor, tau: float = 0.5) -> Tensor:
    """GRACE's instance-level contrastive loss (scalar, nats per node).

    ``z1``, ``z2`` ``[n, k]`` are the projection-head outputs of the same nodes in two views.
    Rows are L2-normalised; node i in view 1 and view 2 form the positive pair, and all other nodes
    of both views (inter- and intra-view) are negatives; the loss is averaged over both directions.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"the two views must have one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    return _nt_xent(z1, z2, tau)


def feature_contrastive_loss(h1: Tensor, h2: Tensor, components: Tensor, tau: float = 0.5) -> Tensor:
    """TEA-GLM's feature-level contrastive loss in the LLM's token space (scalar, nats per feature).

    ``h1``, ``h2`` ``[n, d_lm]`` are GNN outputs of two views; ``components`` ``[d_lm, c]`` the
    LLM's principal directions (:func:`llm_principal_components`). Each view is projected,
    ``Z = h @ components`` ``[n, c]``, and each of the ``c`` columns is treated as an instance
    (L2-normalised over nodes): column j of view 1 and view 2 are positives, all other columns
    negatives, with the same symmetrised NT-Xent as :func:`grace_loss`.
    """
    if h1.shape != h2.shape:
        raise ValueError(f"the two views must have one shape, got {tuple(h1.shape)} and {tuple(h2.shape)}")
    if h1.shape[1] != components.shape[0]:
        raise ValueError(
            f"GNN output width {h1.shape[1]} does not match the LLM width {components.shape[0]} of "
            "components; build the GNN with out_dim equal to the LLM's embedding width"
        )
    return _nt_xent((h1 @ components).T, (h2 @ components).T, tau)


class _ProjectionHead(nn.Module):
    """GRACE's 2-layer MLP: ``[n, d] -> [n, k]`` with an ELU between the layers."""

    def __init__(self, in_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, proj_dim)
        self.fc2 = nn.Linear(proj_dim, proj_dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(F.elu(self.fc1(h)))


def _augment(
    x: Tensor, edge_index: Tensor, p_edge: float, p_feature: float, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One view: drop each edge with probability ``p_edge`` and zero each feature column (for all
    nodes) with probability ``p_feature``. Returns the masked features and the kept edges as a
    sparse CSR ``adj_t`` ``[n, n]`` (row = target), which PyG aggregates faster than an edge list."""
    keep = torch.rand(edge_index.shape[1], generator=g, device=x.device) >= p_edge
    mask = torch.rand(x.shape[1], generator=g, device=x.device) >= p_feature
    with warnings.catch_warnings(), torch.sparse.check_sparse_tensor_invariants(enable=True):
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        adj_t = to_torch_csr_tensor(edge_index[:, keep].flip(0), size=(x.shape[0], x.shape[0]))
    return x * mask.to(x.dtype), adj_t


def _check_setup(gnn: GraphSAGEEncoder, x: Tensor, components: Tensor, config: GraphPretrainConfig) -> None:
    if gnn.out_dim != components.shape[0]:
        raise ValueError(
            f"GNN out_dim is {gnn.out_dim} but the LLM width (components.shape[0]) is "
            f"{components.shape[0]}; build GraphSAGEEncoder(..., out_dim={components.shape[0]}) so "
            "its outputs live in the LLM's token-embedding space"
        )
    if components.shape[1] != config.n_components:
        raise ValueError(
            f"components has {components.shape[1]} columns but config.n_components is "
            f"{config.n_components}; compute them with llm_principal_components(emb, config.n_components)"
        )
    if len(gnn.convs) != config.num_layers or (
        config.num_layers > 1 and gnn.convs[0].out_channels != config.hidden_dim
    ):
        raise ValueError(
            f"the GNN has {len(gnn.convs)} layers of width {gnn.convs[0].out_channels} but the config "
            f"says num_layers={config.num_layers}, hidden_dim={config.hidden_dim}; make them agree"
        )
    if gnn.convs[0].in_channels != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the GNN expects {gnn.convs[0].in_channels}")


def pretrain_graph_encoder(
    gnn: GraphSAGEEncoder,
    x: Tensor,
    edge_index: Tensor,
    components: Tensor,
    config: GraphPretrainConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train ``gnn`` in place, full batch, with ``grace + feature_loss_weight * feature`` loss.

    Each epoch draws two augmented views, feeds each to the GNN as a sparse CSR adjacency (same
    result as the edge list, faster on a CPU) and takes one Adam step. The GRACE term holds three
    ``[n, n]`` float buffers (88 MB for Cora's 2,708 nodes). An epoch on Cora at width 576 is
    about 60 GFLOP of matmuls (36 in the GNN, 20 in the GRACE similarities).

    Args:
        gnn: the encoder, ``out_dim`` equal to the LLM width ``d_lm``.
        x: node features ``[n, in_dim]``; edge_index: ``[2, E]`` long (duplicates are merged).
        components: ``[d_lm, c]`` from :func:`llm_principal_components`.
        config: hyperparameters; ``config.seed`` fixes the projection head's initialisation and
            every epoch's augmentations (drawn from a generator seeded by ``(seed, epoch)``).
        checkpoint: file for the state (GNN, projection head, optimizer, epoch, history, CPU RNG
            state), written atomically every ``checkpoint_every`` epochs and at the end. If it
            exists, training resumes from it and ends exactly as an uninterrupted run would (on
            a CPU; CUDA dropout and scatter kernels need not be reproducible); a checkpoint from a
            different config (other than ``epochs``/``checkpoint_every``) is refused.
        progress: show a tqdm progress bar.

    Returns:
        Per-epoch history (all epochs, including resumed ones): ``loss``, ``grace``, ``feature``.
        The caller's global RNG state is untouched; ``gnn`` is left in eval mode.
    """
    _check_setup(gnn, x, components, config)
    edge_index = coalesce(edge_index, num_nodes=x.shape[0])
    components = components.detach().to(device=x.device, dtype=x.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = _ProjectionHead(gnn.out_dim, config.proj_dim).to(x.device)

        def step(rows: None, epoch: int) -> dict[str, Tensor]:
            g = torch.Generator(device=x.device).manual_seed((config.seed << 32) + epoch)
            x1, e1 = _augment(x, edge_index, config.drop_edge[0], config.mask_feature[0], g)
            x2, e2 = _augment(x, edge_index, config.drop_edge[1], config.mask_feature[1], g)
            h1, h2 = gnn(x1, e1), gnn(x2, e2)
            grace = grace_loss(head(h1), head(h2), config.tau)
            feature = feature_contrastive_loss(h1, h2, components, config.tau)
            return {"loss": grace + config.feature_loss_weight * feature, "grace": grace, "feature": feature}

        saved = (
            None
            if checkpoint is None
            else Checkpoint(
                checkpoint,
                {"gnn": gnn, "head": head},
                every=config.checkpoint_every,
                identity={k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES},
            )
        )
        gnn.train()
        head.train()
        result = fit(
            step,
            [*gnn.parameters(), *head.parameters()],
            steps=config.epochs,
            lr=config.lr,
            weight_decay=config.weight_decay,
            checkpoint=saved,
            progress=progress,
            desc="pretrain GNN",
        )
    gnn.eval()
    return result.history


def linear_probe_accuracy(
    embeddings: Tensor, labels: Tensor, split: dict[str, Tensor], epochs: int = 200, seed: int = 0
) -> dict[str, float]:
    """Fit a logistic regression on ``split["train"]`` and report train/val/test accuracy (0-1).

    ``embeddings`` ``[n, d]`` are standardised with the training nodes' mean and std; the model is
    trained full batch with Adam (lr 0.01, weight decay 1e-4) for ``epochs`` steps.
    """
    emb = embeddings.detach().float()
    train = split["train"]
    mean, std = emb[train].mean(dim=0), emb[train].std(dim=0).clamp_min(1e-6)
    emb = (emb - mean) / std
    num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(emb.shape[1], num_classes).to(emb.device)
    fit(
        lambda rows, index: F.cross_entropy(probe(emb[train]), labels[train]),
        probe.parameters(),
        steps=epochs,
        lr=0.01,
        weight_decay=1e-4,
    )
    with torch.no_grad():
        predicted = probe(emb).argmax(dim=1)
    return {name: (predicted[idx] == labels[idx]).float().mean().item() for name, idx in split.items()}
