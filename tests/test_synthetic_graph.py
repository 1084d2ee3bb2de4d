"""Synthetic graph + text tasks: the planted-community generator and its ground truth, the trained and
cached GraphTextFusion, its adapter, and explainers on it."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.data.graph_tasks import (
    FEATURE_DIM,
    GRAPH_TASKS,
    N_COMMUNITIES,
    N_NODES,
    P_IN,
    P_OUT,
    SIDES,
    TEXT_LEN,
    VOCAB,
    WORD_ID,
    bayes_accuracy,
    centroid_accuracy,
    make_graph_task,
)
from mmlens.metrics.desiderata import granger
from mmlens.models.fusion import Attention
from mmlens.models.graph_text import GraphTextFusion
from mmlens.training import classifier
from mmlens.training import graph_text as graph_training
from mmlens.training.graph_text import train_graph_text

QUICK = {"n_train": 2000, "n_test": 400, "seed": 0}
K = graph_training.MODEL_DEFAULTS["n_graph_tokens"]


@pytest.fixture(scope="module")
def tasks():
    return {name: make_graph_task(name, 3000, seed=0) for name in GRAPH_TASKS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMLENS_CACHE", str(tmp_path_factory.mktemp("mmlens-cache")))
        yield {name: train_graph_text(name, **QUICK) for name in GRAPH_TASKS}


def test_generators_are_deterministic_and_share_the_graph_of_a_seed():
    keys = (
        "node_features",
        "edge_index",
        "communities",
        "is_query",
        "node_index",
        "input_ids",
        "attention_mask",
        "labels",
        "text_key",
    )
    for name in GRAPH_TASKS:
        a, b, c = (
            make_graph_task(name, 50, seed=3),
            make_graph_task(name, 50, seed=3),
            make_graph_task(name, 50, seed=4),
        )
        for key in keys:
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
        assert not torch.equal(a.node_features, c.node_features)
    one, other = (make_graph_task(name, 20, seed=3) for name in GRAPH_TASKS)
    assert torch.equal(one.edge_index, other.edge_index) and torch.equal(one.node_features, other.node_features)


def test_graph_has_planted_communities_and_examples_are_about_query_nodes(tasks):
    for task in tasks.values():
        n, (src, dst) = len(task), task.edge_index
        assert task.node_features.shape == (N_NODES, FEATURE_DIM) and task.node_features.dtype == torch.float32
        assert task.edge_index.dtype == task.node_index.dtype == task.input_ids.dtype == torch.long
        assert not (src == dst).any()
        assert set(zip(src.tolist(), dst.tolist())) == set(zip(dst.tolist(), src.tolist()))  # undirected
        assert (task.communities.bincount() == N_NODES // N_COMMUNITIES).all()
        homophily = float((task.communities[src] == task.communities[dst]).float().mean())
        assert homophily > 0.8, homophily
        size = N_NODES // N_COMMUNITIES
        assert abs(len(src) / N_NODES - (P_IN * (size - 1) + P_OUT * (N_NODES - size))) < 1  # mean degree
        assert task.is_query.sum() == N_NODES // 2 and task.is_query[task.node_index].all()
        assert torch.equal(task.graph_attrs["community"], task.communities[task.node_index])
        assert task.input_ids.shape == task.attention_mask.shape == task.text_key.shape == (n, TEXT_LEN)
        assert task.vocab == VOCAB and torch.equal(task.input_ids == 0, task.attention_mask == 0)
        assert set(task.labels.unique().tolist()) == set(range(task.n_classes))
        batch = task.batch([4, 2])
        assert batch["node_features"] is task.node_features and batch["edge_index"] is task.edge_index
        assert torch.equal(batch["node_index"], task.node_index[[4, 2]])
        sub = task.subset([5, 1])
        assert torch.equal(sub.labels, task.labels[[5, 1]]) and sub.node_features is task.node_features


def test_ground_truth_the_neighbourhood_not_the_node_decides(tasks):
    only, xor = tasks["graph_only"], tasks["graph_text_synergy"]
    chance = float(only.labels.bincount().max()) / len(only)
    assert bayes_accuracy(only, "graph") == 1.0 and bayes_accuracy(only, "text") == chance
    assert centroid_accuracy(only, "self") < chance + 0.05  # a target's own features are noise
    assert centroid_accuracy(only, "neighbours") > 0.9  # its neighbours' mean reveals the community
    side_ids = torch.tensor([WORD_ID[s] for s in SIDES])
    assert not only.text_key.any() and not torch.isin(only.input_ids, side_ids).any()
    # XOR: each modality alone is at chance, both together determine the label
    assert abs(bayes_accuracy(xor, "graph") - 0.5) < 0.03 and abs(bayes_accuracy(xor, "text") - 0.5) < 0.03
    assert torch.equal(xor.labels, (xor.graph_attrs["community"] // 2 == xor.text_attrs["side"]).long())
    assert (xor.text_key.sum(1) == 1).all() and torch.equal(
        xor.input_ids[xor.text_key], side_ids[xor.text_attrs["side"]]
    )


def test_unknown_task_name_suggests():
    with pytest.raises(ValueError, match=r"did you mean \['graph_only'"):
        make_graph_task("graph_onyl", 10)


def test_training_learns_both_tasks_and_needs_the_right_modalities(trained):
    only, xor = trained["graph_only"], trained["graph_text_synergy"]
    for t in (only, xor):
        assert t.learned and t.accuracy >= 0.9 and not t.from_cache and not t.model.training
        assert t.cache_path.is_file() and (t.cache_path.parent / "manifest.json").is_file()
    assert only.neutral_accuracy["graph"] < 0.4 and only.neutral_accuracy["text"] >= 0.9
    assert max(xor.neutral_accuracy.values()) < 0.7


def test_a_cache_hit_loads_identical_weights_and_training_is_deterministic(trained, monkeypatch):
    monkeypatch.setattr(classifier, "fit", lambda *a, **k: pytest.fail("a cache hit must not train"))
    first = trained["graph_only"]
    again = train_graph_text("graph_only", **QUICK)
    assert again.from_cache and again.cache_path == first.cache_path and again.accuracy == first.accuracy
    assert again.train_seconds == first.train_seconds and again.neutral_accuracy == first.neutral_accuracy
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    tiny = {"n_train": 200, "n_test": 20, "max_steps": 3, "cache": False}
    one, two = (train_graph_text("graph_text_synergy", **tiny).model.state_dict() for _ in range(2))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_wrapped_model_equals_the_plain_one_and_has_graph_and_text_spans(trained):
    t = trained["graph_text_synergy"]
    hm = mmlens.wrap(t.model)
    assert hm.adapter.name == "graph-text-fusion" and isinstance(hm.model, GraphTextFusion)
    batch = t.batch(range(6))
    run = hm.run(batch, cache=["fusion.embeds", "graph.blocks.1.out", "lm.blocks.1.resid_post"])
    with torch.no_grad():
        assert torch.equal(run.logits, t.model(**batch).logits)
    assert run.cache["fusion.embeds"].shape == (6, K + TEXT_LEN, 64)
    assert run.cache["graph.blocks.1.out"].shape == (N_NODES, 64)
    spans = hm.spans(batch)
    assert spans.masks["graph"][:, :K].all() and not spans.masks["graph"][:, K:].any()
    assert torch.equal(spans.masks["text"][:, K:], batch["attention_mask"].bool())
    # an edit at the fused sequence reaches the output: the graph tokens of another target node
    other = {**batch, "node_index": batch["node_index"].flip(0)}
    swapped = hm.run(
        batch, edits=[mmlens.replace("fusion.embeds", hm.run(other, cache="fusion.embeds").cache["fusion.embeds"])]
    )
    assert torch.equal(swapped.logits, hm.run(other).logits)


def test_explainers_run_on_one_row(trained):
    t = trained["graph_text_synergy"]
    hm = mmlens.wrap(t.model)
    row = t.batch([0])
    for method in ("occlusion", "integrated_gradients", "attention"):
        ig = {"steps": 8, "on_failure": "record"}  # the guard's refusal on this model is tested in test_explainers
        explanation = mmlens.explain(hm, row, method, **(ig if method == "integrated_gradients" else {}))
        assert explanation.scores.shape == (1, K + TEXT_LEN)
        importance = explanation.importance()
        assert set(importance) == {"graph", "text"} and all(torch.isfinite(v).all() for v in importance.values())
    assert not any(m.return_weights for m in t.model.modules() if isinstance(m, Attention))


def test_granger_graph_influence_dominates_on_graph_only(trained):
    t = trained["graph_only"]
    result = granger(mmlens.wrap(t.model), t.batch(range(8)), ["occlusion"], progress=False)
    delta = result.influence.groupby("modality").delta_js.mean()
    assert delta["graph"] > 0.2 and delta["graph"] > 20 * delta["text"], delta.to_dict()
