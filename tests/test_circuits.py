"""Circuits: keep/remove interventions are bit-exact, nodes from sweeps and edges, JSON round trip, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mmlens
from mmlens.methods.circuits import ABLATIONS, Circuit, Node, circuit_edits, components, intervene
from mmlens.methods.patching import corrupt, edge_attribution_patch, kl_from, sweep


def _flip(inputs):
    """The batch with its rows reversed: the same layout, other activations (a resample reference)."""
    return {k: v.flip(0) for k, v in inputs.items()}


def _rows(inputs, rows):
    return {k: v[rows] for k, v in inputs.items()}


@pytest.fixture(scope="module", params=["tinystories", "llava"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def story(loaded):
    lm = loaded("tinystories-656k")
    hm = mmlens.wrap(lm.model, tokenizer=lm.tokenizer)
    clean = dict(lm.tokenizer(["Once upon a time there was a little girl who"], return_tensors="pt"))
    return hm, clean, corrupt(hm, clean, "text", "noise", noise=2.0, seed=1)


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_keep_and_remove_of_the_whole_universe_and_of_nothing(model, ablation):
    hm, inputs = model
    reference = _flip(inputs) if ablation == "resample" else None
    plain = hm.run(inputs)
    universe = components(hm)
    assert [n.hook for n in universe] == [f"lm.blocks.{i}.{k}" for i in range(2) for k in ("attn_out", "mlp_out")]
    ref = hm.run(reference, cache=[n.hook for n in universe]) if reference else None
    by_hand = [mmlens.replace(n.hook, ref.cache[n.hook]) if ref else mmlens.ablate(n.hook) for n in universe]
    ablated = hm.run(inputs, edits=by_hand).logits
    assert not torch.equal(ablated, plain.logits)

    everything = Circuit(tuple(universe))
    kept = intervene(hm, inputs, everything, "keep", ablation, reference=reference)
    assert torch.equal(kept.logits, plain.logits)
    clean_last = hm.readout_logits(plain.logits, inputs)
    assert (kl_from(clean_last)(hm.readout_logits(kept.logits, inputs)) == 0).all()  # sufficiency gap 0
    removed = intervene(hm, inputs, everything, "remove", ablation, reference=reference)
    assert torch.equal(removed.logits, ablated)
    assert torch.equal(intervene(hm, inputs, Circuit(), "remove", ablation, reference=reference).logits, plain.logits)
    nothing_kept = intervene(
        hm, inputs, Circuit(), "keep", ablation, reference=reference, kinds=("attn_out", "mlp_out")
    )
    assert torch.equal(nothing_kept.logits, ablated)


def test_head_nodes_write_the_reference_at_their_heads_only(llava):
    hm, inputs = llava
    reference = _flip(inputs)
    names = ["lm.blocks.0.z", "lm.blocks.1.z"]
    plain, ref = hm.run(inputs, cache=names).cache, hm.run(reference, cache=names).cache
    circuit = Circuit((Node("lm.blocks.0.z", heads=(1,)),))
    removed = intervene(hm, inputs, circuit, "remove", "resample", reference=reference, cache=names).cache
    others = [0, 2, 3]
    assert torch.equal(removed["lm.blocks.0.z"][:, :, 1], ref["lm.blocks.0.z"][:, :, 1])
    assert torch.equal(removed["lm.blocks.0.z"][:, :, others], plain["lm.blocks.0.z"][:, :, others])
    # keep: the universe is every head of every layer (kind z); only head 1 of layer 0 keeps its own value
    kept = intervene(hm, inputs, circuit, "keep", "resample", reference=reference, cache=names).cache
    assert torch.equal(kept["lm.blocks.0.z"][:, :, 1], plain["lm.blocks.0.z"][:, :, 1])
    assert torch.equal(kept["lm.blocks.0.z"][:, :, others], ref["lm.blocks.0.z"][:, :, others])
    assert torch.equal(kept["lm.blocks.1.z"], ref["lm.blocks.1.z"])
    assert len(components(hm, kinds=("z",))) == 2 * 4


def test_span_and_position_nodes_write_the_reference_at_their_positions_only(llava):
    hm, inputs = llava
    reference = _flip(inputs)
    image = hm.spans(inputs).masks["image"]
    point = "lm.blocks.0.attn_out"
    plain, ref = hm.run(inputs, cache=point).cache[point], hm.run(reference, cache=point).cache[point]
    assert not torch.equal(plain[image], ref[image]) and not torch.equal(plain[~image], ref[~image])
    circuit = Circuit((Node(point, at="image"),))
    removed = intervene(hm, inputs, circuit, "remove", "resample", reference=reference, cache=point).cache[point]
    assert torch.equal(removed[image], ref[image]) and torch.equal(removed[~image], plain[~image])
    kept = intervene(hm, inputs, circuit, "keep", "resample", reference=reference, cache=point).cache[point]
    assert torch.equal(kept[image], plain[image]) and torch.equal(kept[~image], ref[~image])
    # an encoder point, by position, with a batch-1 reference broadcast over the batch
    encoder = "vision.blocks.0.attn_out"
    one = _rows(inputs, slice(1, 2))
    plain_e, ref_e = hm.run(inputs, cache=encoder).cache[encoder], hm.run(one, cache=encoder).cache[encoder]
    node = Circuit((Node(encoder, at=(0, 3)),))
    for mode, ablated in (("remove", [0, 3]), ("keep", [p for p in range(plain_e.shape[1]) if p not in (0, 3)])):
        out = intervene(hm, inputs, node, mode, "resample", reference=one, cache=encoder).cache[encoder]
        untouched = [p for p in range(plain_e.shape[1]) if p not in ablated]
        assert torch.equal(out[:, ablated], ref_e.expand_as(plain_e)[:, ablated]), mode
        assert torch.equal(out[:, untouched], plain_e[:, untouched]), mode


def test_mean_and_neutral_ablation_values(llava, tinystories):
    hm, inputs = llava
    point = "lm.blocks.0.attn_out"
    circuit = Circuit((Node(point),))
    one = _rows(inputs, slice(0, 1))
    resampled = intervene(hm, inputs, circuit, "remove", "resample", reference=one, cache=point).cache[point]
    mean = intervene(hm, inputs, circuit, "remove", "mean", reference=one, cache=point).cache[point]
    assert torch.equal(mean, resampled)  # the mean of one row is that row, bit for bit
    per_position = intervene(hm, inputs, circuit, "remove", "mean", reference=inputs, cache=point).cache[point]
    assert torch.equal(per_position[0], per_position[1])  # one mean per position, the same in every row
    assert torch.allclose(per_position[0], hm.run(inputs, cache=point).cache[point].mean(0), atol=1e-6)
    for modality, neutral in (
        ("image", hm.neutral(inputs, "image")),
        (None, hm.neutral(hm.neutral(inputs, "image"), "text")),
    ):
        out = intervene(hm, inputs, circuit, "remove", "neutral", modality=modality, cache=point).cache[point]
        assert torch.equal(out, hm.run(neutral, cache=point).cache[point]), modality
    # a reference of another length: the mean over its positions, the same at every position
    text_hm, batch = tinystories
    shorter = _rows(batch, (slice(None), slice(0, 5)))
    ref_act = text_hm.run(shorter, cache=point).cache[point]
    out = intervene(text_hm, batch, circuit, "remove", "mean", reference=shorter, cache=point).cache[point]
    assert out.shape == (2, 9, ref_act.shape[-1]) and (out == out[0, 0]).all()
    assert torch.allclose(out[0, 0], ref_act.mean((0, 1)), atol=1e-6)


def test_from_sweep_from_edges_and_json_round_trip(story, tmp_path):
    hm, clean, corrupted = story
    result = sweep(hm, clean, corrupted, "kl", progress=False)
    circuit = Circuit.from_sweep(result, k=3)
    table = result.table
    chosen = [(int(n.hook.split(".")[2]), n.at[0]) for n in circuit.nodes]
    assert len(chosen) == 3 and all(n.hook.endswith(".resid_pre") and n.heads is None for n in circuit.nodes)
    score = {(r.layer, r.position): abs(r.normalized) for r in table.itertuples()}
    assert min(score[c] for c in chosen) >= max(v for c, v in score.items() if c not in chosen)
    assert score[chosen[0]] == max(score.values())
    heads = Circuit.from_sweep(
        sweep(hm, clean, corrupted, "kl", hook="z", axes=("layer", "head"), progress=False), k=2, value="value"
    )
    assert all(n.hook.endswith(".z") and n.at is None and len(n.heads) == 1 for n in heads.nodes)
    kept = intervene(hm, clean, heads, "keep", "resample", reference=corrupted)  # a Corruption: run with its edits
    assert kept.logits.shape == hm.run(clean).logits.shape

    path = circuit.save(tmp_path / "circuit.json")
    assert json.loads(path.read_text())["version"] == 1
    assert Circuit.load(path) == circuit and Circuit.from_dict(heads.to_dict()) == heads

    clean_last = hm.readout_logits(hm.run(clean).logits, clean)
    scores = edge_attribution_patch(hm, clean, corrupted, kl_from(clean_last))
    edges = Circuit.from_edges(scores, k=4)
    top = scores.top(4)
    assert set(edges.edges) == set(zip(top.sender, top.receiver))
    endpoints = {h for e in edges.edges for h in e} - {"lm.blocks.0.resid_pre", "lm.final_norm"}
    assert {n.hook for n in edges.nodes} == endpoints and all(n.at is None for n in edges.nodes)
    only_edges = Circuit(edges=edges.edges)
    assert set(only_edges.effective_nodes) == set(edges.nodes)
    assert Circuit.load(edges.save(tmp_path / "edges.json")) == edges
    assert torch.equal(
        intervene(hm, clean, only_edges, "remove", "zero").logits, intervene(hm, clean, edges, "remove", "zero").logits
    )


def test_nodes_normalise_and_reject_bad_fields():
    node = Node("lm.blocks.0.z", at=[1, 2], heads=3)
    assert node == Node("lm.blocks.0.z", at=(1, 2), heads=(3,)) and Node.from_dict(node.to_dict()) == node
    with pytest.raises(TypeError, match="Node.heads"):
        Node("lm.blocks.0.z", heads=True)
    with pytest.raises(ValueError, match="newer"):
        Circuit.from_dict({**Circuit().to_dict(), "version": 99})


def test_errors_name_what_is_valid(tinystories):
    hm, batch = tinystories
    with pytest.raises(KeyError, match=r"nearest valid names: \[.*'lm\.blocks\.0\.attn_out'"):
        intervene(hm, batch, Circuit((Node("lm.blocks.0.atn_out"),)), "remove", "zero")
    shorter = _rows(batch, (slice(0, 1), slice(0, 5)))
    with pytest.raises(ValueError, match=r"\(2, 9\) for the inputs vs \(1, 5\) for the reference"):
        intervene(hm, batch, Circuit((Node("lm.blocks.0.attn_out"),)), "remove", "resample", reference=shorter)
    with pytest.raises(ValueError, match="no head axis.*lm.blocks.0.z"):
        circuit_edits(hm, batch, Circuit((Node("lm.blocks.0.attn_out", heads=(1,)),)), "remove", "zero")
    with pytest.raises(ValueError, match=r"valid modes: \['keep', 'remove'\]"):
        circuit_edits(hm, batch, Circuit(), "drop", "zero")
    with pytest.raises(ValueError, match=re.escape(f"valid ablations: {list(ABLATIONS)!r}")):
        circuit_edits(hm, batch, Circuit(), "keep", "gaussian")
    with pytest.raises(ValueError, match="needs reference="):
        circuit_edits(hm, batch, Circuit(), "keep", "mean")
    with pytest.raises(ValueError, match="kinds there"):
        components(hm, kinds=("nope",))


def test_random_baselines_are_matched_in_cells(story):
    from mmlens.methods.circuits import cell_count, matched_random_circuit
    from mmlens.metrics.desiderata import circuit_faithfulness

    hm, clean, _ = story
    circuit = Circuit(
        (
            Node("lm.blocks.0.z", at=(1, 3), heads=(0,)),
            Node("lm.blocks.1.mlp_out", at=(2,)),
            Node("lm.blocks.1.attn_out"),
        )
    )
    seq = int(hm.spans(clean).valid[0].sum())
    assert cell_count(hm, circuit, clean) == 2 * 1 + 1 + seq
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        random = matched_random_circuit(hm, circuit, clean, generator)
        assert cell_count(hm, random, clean) == cell_count(hm, circuit, clean)
        assert [hm.resolve(n.hook).kind for n in random.nodes] == ["z", "mlp_out", "attn_out"]
    table = circuit_faithfulness(hm, clean, circuit, "neutral", random_draws=3, progress=False)
    cells = table.set_index("source").cells
    assert cells["circuit"] == cells["random"] == cell_count(hm, circuit, clean)


def test_edge_circuits_are_evaluated_by_path_patching(story):
    from mmlens.methods.circuits import edge_patch
    from mmlens.methods.explainers import predicted_prob
    from mmlens.metrics.desiderata import circuit_faithfulness

    hm, clean, _ = story
    neutral = hm.neutral(clean, "text")
    metric = predicted_prob(hm, clean)
    f_clean = float(metric(hm.readout_logits(hm.run(clean).logits, clean))[0])
    f_neutral = float(metric(hm.readout_logits(hm.run(neutral).logits, neutral))[0])
    assert edge_patch(hm, clean, neutral, metric, ()) == f_clean
    senders = ["lm.blocks.0.resid_pre"] + [n for n, hp in hm.hook_points.items() if hp.kind in ("attn_out", "mlp_out")]
    every_path = tuple((s, "lm.final_norm") for s in senders)  # every path into the read-out: the neutral run
    assert abs(edge_patch(hm, clean, neutral, metric, every_path) - f_neutral) < 1e-6
    edges = (("lm.blocks.0.attn_out", "lm.blocks.1.attn_out"),)
    circuit = Circuit(edges=edges)
    table = circuit_faithfulness(hm, clean, circuit, "neutral", random_draws=2, progress=False).set_index("source")
    assert set(table.index) == {"circuit", "random", "circuit_edges", "random_edges"}
    via_paths = edge_patch(hm, clean, neutral, metric, edges)
    assert abs(table.f_remove["circuit_edges"] - via_paths) < 1e-6
    # as edges, only the path from layer 0's attention into layer 1's attention carries the ablation;
    # as nodes, both components are ablated outright
    assert table.f_remove["circuit_edges"] != table.f_remove["circuit"]
    with pytest.raises(ValueError, match="use ablation 'neutral' or 'resample'"):
        circuit_faithfulness(hm, clean, circuit, "zero", progress=False)
