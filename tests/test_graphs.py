"""Text-attributed graph loading, splits, LM-space features and TEA-GLM's GNN pretraining."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmlens.data.graphs import load_text_attributed_graph, stratified_split, text_features
from mmlens.models.tea_glm import GraphSAGEEncoder
from mmlens.training.graph_pretraining import (
    GraphPretrainConfig,
    feature_contrastive_loss,
    grace_loss,
    linear_probe_accuracy,
    llm_principal_components,
    pretrain_graph_encoder,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small: worker threads cost more than they save, and on a busy 2-core
    machine they make each op wait for a free core (100x slower pretraining)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lm(models_dir: Path):
    """TinyStories-656K's tokenizer and input-embedding matrix ``[vocab, 128]``."""
    path = models_dir / "tinystories-656k"
    model = AutoModelForCausalLM.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path), model.get_input_embeddings().weight.detach()


@pytest.fixture(scope="module")
def synthetic():
    return load_text_attributed_graph("synthetic", seed=0)


def _undirected_simple(edge_index: torch.Tensor) -> bool:
    edges = set(map(tuple, edge_index.t().tolist()))
    return (
        len(edges) == edge_index.shape[1] and all((d, s) in edges for s, d in edges) and all(s != d for s, d in edges)
    )


def test_cora_loads():
    g = load_text_attributed_graph("cora")
    assert (g.num_nodes, g.num_classes, g.name, g.synthetic) == (2708, 7, "cora", False)
    assert g.labels.shape == (2708,) and g.labels.dtype == torch.long
    assert g.majority_baseline() == 818 / 2708
    assert g.class_names[0] == "Rule_Learning" and g.class_words[0] == "rule learning"
    assert "case based reasoning" in g.class_words
    assert g.titles[0] == "Stochastic pro-positionalization of non-determinate background knowledge"
    assert all(t and len(t) <= 300 for t in g.titles)
    assert g.edge_index.shape == (2, 10556) and _undirected_simple(g.edge_index)
    assert g.source.endswith(os.path.join("cora_tag", "cora.json"))


def test_cora_from_its_own_folder(data_dir):
    folder = data_dir / "cora_tag"
    assert load_text_attributed_graph("cora", data_dir=folder).num_nodes == 2708


def test_missing_cora_explains_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        load_text_attributed_graph("cora", data_dir=tmp_path)
    message = str(err.value)
    for looked in (tmp_path / "cora_tag" / "cora.json", tmp_path / "cora.json"):
        assert str(looked) in message
    for hint in ("--data-dir", "MMLENS_DATA", "--dataset synthetic", "labels.json"):
        assert hint in message
    monkeypatch.setenv("MMLENS_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_text_attributed_graph("cora")


def test_malformed_cora_is_named(tmp_path):
    (tmp_path / "cora.json").write_text(json.dumps({"raw_texts": ["a. : b"], "y": [0]}))
    (tmp_path / "labels.json").write_text(json.dumps({"labels": ["A"]}))
    with pytest.raises(ValueError, match="edge_index"):
        load_text_attributed_graph("cora", data_dir=tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="cora.*synthetic"):
        load_text_attributed_graph("citeseer")


def test_synthetic_is_seeded_and_homophilous(synthetic):
    again = load_text_attributed_graph("synthetic", seed=0)
    other = load_text_attributed_graph("synthetic", seed=1)
    assert synthetic.texts == again.texts and torch.equal(synthetic.edge_index, again.edge_index)
    assert torch.equal(synthetic.labels, again.labels)
    assert synthetic.texts != other.texts and not torch.equal(synthetic.labels, other.labels)
    assert (synthetic.num_nodes, synthetic.num_classes, synthetic.synthetic) == (700, 7, True)
    assert synthetic.source == "generated (seed=0)"
    assert synthetic.class_words == load_text_attributed_graph("cora").class_words
    assert all(". : " in t for t in synthetic.texts)
    assert _undirected_simple(synthetic.edge_index)
    src, dst = synthetic.edge_index
    assert (synthetic.labels[src] == synthetic.labels[dst]).float().mean() > 0.6
    assert synthetic.majority_baseline() < 0.25


def test_stratified_split(synthetic):
    labels = synthetic.labels
    split = stratified_split(labels, seed=3)
    allnodes = torch.cat(list(split.values()))
    assert torch.equal(allnodes.sort()[0], torch.arange(len(labels)))
    for c in range(7):
        n_c = (labels == c).sum().item()
        assert (labels[split["val"]] == c).sum() == int(0.2 * n_c)
        assert (labels[split["test"]] == c).sum() == int(0.2 * n_c)
    assert all(torch.equal(split[k], v) for k, v in stratified_split(labels, seed=3).items())
    assert not torch.equal(split["test"], stratified_split(labels, seed=4)["test"])
    with pytest.raises(ValueError, match="sum"):
        stratified_split(labels, seed=0, fractions=(0.5, 0.2, 0.2))


def test_text_features_are_standardised_idf_means(tiny_lm):
    tokenizer, emb = tiny_lm
    texts = ["The cat sat on the mat.", "The dog ran.", "A cat and a dog.", "The the the cat sat."]
    feats = text_features(texts, tokenizer, emb, max_tokens=5)
    assert feats.shape == (4, emb.shape[1])
    assert torch.allclose(feats.mean(dim=0), torch.zeros(emb.shape[1]), atol=1e-5)
    assert torch.allclose(feats.std(dim=0), torch.ones(emb.shape[1]), atol=1e-4)

    ids = [tokenizer.encode(t, add_special_tokens=False)[:5] for t in texts]
    df = {tok: sum(tok in set(i) for i in ids) for tok in {t for i in ids for t in i}}
    rows = []
    for i in ids:
        w = torch.tensor([math.log(5 / (1 + df[t])) + 1 for t in i])
        rows.append((w[:, None] * emb[i]).sum(dim=0) / w.sum())
    expected = torch.stack(rows)
    expected = (expected - expected.mean(dim=0)) / expected.std(dim=0)
    assert torch.allclose(feats, expected, atol=1e-4)


def _reference_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    eye = torch.eye(a.shape[0], dtype=torch.bool)

    def side(x, y):
        logits = torch.cat([x @ y.T, (x @ x.T).masked_fill(eye, -math.inf)], dim=1) / tau
        return (torch.logsumexp(logits, dim=1) - (x * y).sum(dim=1) / tau).mean()

    return 0.5 * (side(a, b) + side(b, a))


def test_grace_loss_matches_textbook_form_and_prefers_aligned_views():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(40, 8, generator=g, dtype=torch.double, requires_grad=True)
    z2 = torch.randn(40, 8, generator=g, dtype=torch.double, requires_grad=True)
    loss, expected = grace_loss(z1, z2, 0.3), _reference_nt_xent(z1, z2, 0.3)
    assert torch.allclose(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(expected, (z1, z2))):
        assert torch.allclose(got, want)

    z = torch.randn(60, 16, generator=g)
    noisy = z + 0.1 * torch.randn(60, 16, generator=g)
    assert grace_loss(z, noisy) < grace_loss(z, noisy[torch.randperm(60, generator=g)]) - 0.5


def test_feature_loss_prefers_aligned_views():
    g = torch.Generator().manual_seed(0)
    components = llm_principal_components(torch.randn(200, 32, generator=g), 8)
    h = torch.randn(50, 32, generator=g)
    noisy = h + 0.1 * torch.randn(50, 32, generator=g)
    shuffled = noisy[:, torch.randperm(32, generator=g)]
    aligned = feature_contrastive_loss(h, noisy, components)
    assert aligned < feature_contrastive_loss(h, shuffled, components) - 0.5
    with pytest.raises(ValueError, match="LLM width"):
        feature_contrastive_loss(h[:, :16], noisy[:, :16], components)


def test_llm_principal_components():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 12, generator=g) * torch.linspace(3, 0.5, 12)
    pcs = llm_principal_components(emb, 4)
    assert pcs.shape == (12, 4)
    assert torch.allclose(pcs.T @ pcs, torch.eye(4), atol=1e-5)
    _, _, vh = torch.linalg.svd(emb - emb.mean(dim=0), full_matrices=False)
    assert torch.allclose((vh[:4] @ pcs).abs(), torch.eye(4), atol=1e-4)
    assert (pcs.gather(0, pcs.abs().argmax(dim=0, keepdim=True)) > 0).all()
    with pytest.raises(ValueError, match="n_components"):
        llm_principal_components(emb, 13)


def _toy_setup(seed: int = 0):
    """A 120-node synthetic graph with random 16-d features and a random 24-wide 'LLM'."""
    graph = load_text_attributed_graph("synthetic", seed=seed, num_nodes=120)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(graph.num_nodes, 16, generator=g)
    components = llm_principal_components(torch.randn(100, 24, generator=g), 6)
    config = GraphPretrainConfig(hidden_dim=20, epochs=6, n_components=6, proj_dim=8, checkpoint_every=2)
    torch.manual_seed(seed)
    return graph, x, components, config, GraphSAGEEncoder(16, 20, 24, 2, dropout=0.2)


def test_gnn_width_must_match_llm():
    graph, x, components, config, _ = _toy_setup()
    gnn = GraphSAGEEncoder(16, 20, 30, 2)
    with pytest.raises(ValueError, match="out_dim is 30 but the LLM width"):
        pretrain_graph_encoder(gnn, x, graph.edge_index, components, config, progress=False)


def test_resumed_pretraining_equals_uninterrupted(tmp_path):
    graph, x, components, config, gnn = _toy_setup()
    rng_before = torch.get_rng_state()
    straight = pretrain_graph_encoder(gnn, x, graph.edge_index, components, config, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not gnn.training and len(straight["loss"]) == 6

    _, _, _, _, resumed_gnn = _toy_setup()
    ckpt = tmp_path / "gnn.pt"
    first = pretrain_graph_encoder(
        resumed_gnn, x, graph.edge_index, components, replace(config, epochs=3), ckpt, progress=False
    )
    assert len(first["loss"]) == 3 and ckpt.exists() and not list(tmp_path.glob("*.tmp"))
    _, _, _, _, resumed_gnn = _toy_setup()
    resumed = pretrain_graph_encoder(resumed_gnn, x, graph.edge_index, components, config, ckpt, progress=False)
    assert resumed == straight
    for (name, a), b in zip(gnn.state_dict().items(), resumed_gnn.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(ValueError, match="delete it or pass another checkpoint"):
        pretrain_graph_encoder(
            resumed_gnn, x, graph.edge_index, components, replace(config, tau=0.2), ckpt, progress=False
        )


def test_pretraining_makes_probe_beat_majority(synthetic, tiny_lm):
    tokenizer, emb = tiny_lm
    x = text_features(synthetic.texts, tokenizer, emb)
    components = llm_principal_components(emb, 16)
    config = GraphPretrainConfig(hidden_dim=64, epochs=30, lr=0.005, n_components=16, proj_dim=32)
    torch.manual_seed(0)
    gnn = GraphSAGEEncoder(x.shape[1], 64, emb.shape[1], 2)
    history = pretrain_graph_encoder(gnn, x, synthetic.edge_index, components, config, progress=False)
    assert history["loss"][-1] < history["loss"][0]
    split = stratified_split(synthetic.labels, seed=0)
    with torch.no_grad():
        accuracy = linear_probe_accuracy(gnn(x, synthetic.edge_index), synthetic.labels, split)
    assert set(accuracy) == {"train", "val", "test"}
    assert accuracy["test"] > synthetic.majority_baseline(split["test"]) + 0.3
